"""Converters between mqa workdirs and other formats, each a leaf module writing or reading
a workdir through `mqa.workdir`; `python -m mqa.convert COMMAND` runs them (`__main__`):

  hf-llama   a Hugging Face Llama checkpoint in            `mqa.convert.hf_llama`
  hf-gemma3  a Hugging Face Gemma 3 checkpoint in          `mqa.convert.hf_gemma3`
  hf-deepseek-v2  a dense Hugging Face DeepSeek-V2 in      `mqa.convert.hf_deepseek`
  gguf       a llama.cpp GGUF file of a Llama or Gemma 3   `mqa.convert.gguf` (`gguf_gemma3`)
  to-hf      a workdir out as a Hugging Face folder        `mqa.convert.to_hf`
             (Llama, Gemma 3, or DeepSeek-V2 for latent attention)
  uptrain    a workdir with fewer K/V heads (uptraining)   `mqa.convert.uptrain`

Each raises `ConvertError` (one line) for input it cannot convert. The Llama tensor layout
both directions share is `mqa.convert.llama_layout`; Gemma 3's, `mqa.convert.gemma_layout`;
DeepSeek-V2's, `mqa.convert.deepseek_layout`.
"""

from mqa.convert.errors import ConvertError
from mqa.convert.gguf import convert_gguf
from mqa.convert.hf_deepseek import convert_hf_deepseek
from mqa.convert.hf_gemma3 import convert_hf_gemma3
from mqa.convert.hf_llama import convert_hf_llama
from mqa.convert.to_hf import export_hf
from mqa.convert.uptrain import convert_uptrain

__all__ = ["ConvertError", "convert_gguf", "convert_hf_deepseek", "convert_hf_gemma3", "convert_hf_llama", "convert_uptrain", "export_hf"]
