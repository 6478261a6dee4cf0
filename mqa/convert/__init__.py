"""Converters between mqa workdirs and other formats, each a leaf module writing or reading
a workdir through `mqa.workdir`; `python -m mqa.convert COMMAND` runs them (`__main__`):

  hf-llama   a Hugging Face Llama checkpoint in            `mqa.convert.hf_llama`
  gguf       a llama.cpp GGUF file of a Llama in           `mqa.convert.gguf`
  to-hf      a workdir out as a Hugging Face Llama folder  `mqa.convert.to_hf`
  uptrain    a workdir with fewer K/V heads (uptraining)   `mqa.convert.uptrain`

Each raises `ConvertError` (one line) for input it cannot convert. The Llama tensor layout
both directions share is `mqa.convert.llama_layout`.
"""

from mqa.convert.errors import ConvertError
from mqa.convert.gguf import convert_gguf
from mqa.convert.hf_llama import convert_hf_llama
from mqa.convert.to_hf import export_hf
from mqa.convert.uptrain import convert_uptrain

__all__ = ["ConvertError", "convert_gguf", "convert_hf_llama", "convert_uptrain", "export_hf"]
