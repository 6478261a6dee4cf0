"""Every README command works from a fresh clone with nothing beside it.

The repository's files, exactly those a clone would have (git's tracked files plus new,
not-ignored ones, so no runs/ or caches), are copied into an otherwise empty temporary
folder: no `../shared` or anything else beside the repository. There every file in
`configs/` is loaded (and the data paths it names checked: inside the clone, and the
shipped corpora byte for byte as `data/SOURCES.md` lists them), and the README's train,
sweep and eval commands are run in order at toy size.
"""

import csv
import hashlib
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py", "sweep.py")
TIMEOUT = 300  # seconds per command

# A few steps of a 2-layer, d_model 32 model (8 query heads of 4 dimensions, as in both
# configs/default.py and configs/sweep_kv_heads.py). absl takes the last of repeated
# flags, so these win over the same flags in a README command.
TOY_MODEL = ["--config.train.steps=4", "--config.train.log_every=2",
             "--config.train.eval_every=4", "--config.train.eval_batches=1",
             "--config.train.final_eval_tokens=2048", "--config.checkpoint.every=4",
             "--config.train.batch_size=4", "--config.train.warmup_steps=1",
             "--config.model.num_layers=2", "--config.model.d_model=32",
             "--config.model.head_dim=4", "--config.model.mlp_dim=64"]
# The README's eval commands run as written, at the training run's train.seq_len, and
# `--stride=128` needs stride <= seq_len: so train.py trains at seq_len 128 (256 would
# make scoring all of tinyshakespeare take ~5x longer).
TOY = {
    "train.py": TOY_MODEL + ["--config.train.seq_len=128"],
    # One seed per configuration (the config's sweep lists more): the command works;
    # tests/test_sweep.py checks the statistics over seeds.
    "sweep.py": TOY_MODEL + ["--config.train.seq_len=32", "--decode_batch=1",
                             "--decode_context=16", "--seeds=1"],
    "eval.py": [],
}
TOY_SAMPLE = ["--max_new_tokens=8"]  # eval.py --sample


def git_files(root: pathlib.Path) -> list[str]:
    """The paths a clone would hold: tracked files and new ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> pathlib.Path:
    """A copy of the repository's clone files in a folder of its own, nothing beside it."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to know which files a clone has")
    root = tmp_path_factory.mktemp("fresh") / "mqa"
    for name in git_files(REPO):
        source = REPO / name
        if not source.is_file():  # tracked but deleted in the working tree
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    assert sorted(p.name for p in root.parent.iterdir()) == ["mqa"]
    assert not (root.parent / "shared").exists()
    assert not (root / "runs").exists()
    return root


def environment() -> dict:
    """The commands' environment: os.environ carries conftest's JAX compilation cache to the
    subprocesses; XLA compiles without its backend optimizations (2-3x faster to compile,
    the same numbers up to rounding: these tests check that the commands work)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


# Run inside the clone: loads every config with the clone's mqa and configs packages and
# prints, as the last line, {config name: {"data_paths", "points" (of a sweep), "error"}}.
LOAD_CONFIGS = r"""
import json, pathlib, sys
import mqa, mqa.config, mqa.sweep.points
root = pathlib.Path.cwd().resolve()
assert pathlib.Path(mqa.__file__).resolve().is_relative_to(root), mqa.__file__
report = {}
for path in sorted((root / "configs").glob("*.py")):
    if path.name == "__init__.py":
        continue
    entry = report[path.name] = {"data_paths": [], "points": 0, "error": None}
    try:
        config = mqa.config.load_config_file(path, validate_config=False)
        mqa.config.validate(mqa.sweep.points.training_config(config))
        fields = mqa.sweep.points.sweep_fields(config)
        if fields:
            entry["points"] = len(mqa.sweep.points.points(config, fields))  # validates every point
        if config.data.path:
            entry["data_paths"].append(str(config.data.path))
    except Exception as error:
        entry["error"] = f"{type(error).__name__}: {error}"
    print(f"{path.name}: {entry}", file=sys.stderr)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def clone_configs(clone) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD_CONFIGS], cwd=clone, env=environment(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"loading configs/ in the clone failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def shipped_corpora(clone: pathlib.Path) -> dict[str, tuple[int, str]]:
    """{file name: (bytes, sha256)} from the table in data/SOURCES.md."""
    rows = {}
    for line in (clone / "data" / "SOURCES.md").read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"[0-9a-f]{64}", cells[2]):
            rows[cells[0]] = (int(cells[1].replace(",", "")), cells[2])
    return rows


def test_shipped_corpora_match_sources_md(clone):
    rows = shipped_corpora(clone)
    assert "tinyshakespeare.txt" in rows, f"data/SOURCES.md lists no tinyshakespeare.txt: {rows}"
    for name, (size, sha256) in rows.items():
        path = clone / "data" / name
        assert path.is_file(), f"data/SOURCES.md lists {name}, which a clone lacks"
        content = path.read_bytes()
        assert len(content) == size, f"data/{name}: {len(content):,} bytes, SOURCES.md says {size:,}"
        assert hashlib.sha256(content).hexdigest() == sha256, f"data/{name}: sha256 differs from SOURCES.md"


def test_every_config_loads_in_the_clone(clone, clone_configs):
    expected = sorted(p.name for p in (clone / "configs").glob("*.py") if p.name != "__init__.py")
    assert sorted(clone_configs) == expected and expected
    print("configs loaded in the clone:", ", ".join(expected))
    errors = {name: entry["error"] for name, entry in clone_configs.items() if entry["error"]}
    assert not errors, f"configs that do not load in a fresh clone: {errors}"
    corpora = shipped_corpora(clone)
    for name, entry in clone_configs.items():
        for data_path in entry["data_paths"]:
            path = (clone / data_path).resolve()  # relative paths are relative to the clone
            assert path.is_relative_to(clone.resolve()), \
                f"configs/{name} names data outside the repository: {data_path}"
            assert path.exists(), f"configs/{name} names data a fresh clone lacks: {data_path}"
            relative = path.relative_to(clone.resolve())
            if relative.parts[0] == "data" and path.is_file():
                assert relative.name in corpora, \
                    f"configs/{name} reads {relative}, which data/SOURCES.md does not list"
    assert clone_configs["sweep_kv_heads.py"]["data_paths"], \
        "configs/sweep_kv_heads.py names no data path (the README says it trains on tinyshakespeare)"


def readme_commands(readme: pathlib.Path) -> list[list[str]]:
    """The `python train.py|eval.py|sweep.py ...` lines of the README's ```bash blocks,
    backslash continuations joined, split as a shell would (comments dropped)."""
    commands, in_bash, pending = [], False, ""
    for line in readme.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() == "bash"
            pending = ""
            continue
        if not in_bash:
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending, comments=True)
        pending = ""
        if len(words) >= 2 and words[0] == "python" and words[1] in SCRIPTS:
            commands.append(words)
    return commands


def run_in_clone(clone: pathlib.Path, words: list[str]) -> subprocess.CompletedProcess:
    script, args = words[1], words[2:]
    extra = list(TOY[script]) + (TOY_SAMPLE if script == "eval.py" and "--sample" in args else [])
    command = [sys.executable, script, *args, *extra]
    result = subprocess.run(command, cwd=clone, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, (
        f"README command {shlex.join(words)!r} failed in a fresh clone (exit {result.returncode});"
        f" ran {shlex.join(command[1:])}\nstdout tail:\n{result.stdout[-2000:]}\n"
        f"stderr tail:\n{result.stderr[-4000:]}")
    return result


# Run inside the clone with a sweep command's arguments: the points that sweep trains and
# their configurations (points without the seed), from the clone's own mqa.sweep.points.
SWEEP_PLAN = r"""
import json, sys
import mqa.config, mqa.sweep.points
args = sys.argv[1:]
last = lambda name: [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")][-1:]
config = mqa.config.load_config_file(last("config")[0], validate_config=False)
sweeps = [a.split("=", 1)[1] for a in args if a.startswith("--sweep=")]
fields = (mqa.sweep.points.parse_sweep_flags(sweeps, config) if sweeps
          else mqa.sweep.points.sweep_fields(config))
if last("seeds"):
    fields = mqa.sweep.points.with_seeds(fields, int(last("seeds")[0]))
plan = mqa.sweep.points.points(config, fields)
configurations = list(dict.fromkeys(getattr(p, "configuration", p.name) for p in plan))
print(json.dumps({"points": [p.name for p in plan], "configurations": configurations}))
"""


def sweep_plan(clone: pathlib.Path, words: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", SWEEP_PLAN, *words[2:]], cwd=clone,
                            env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"planning {shlex.join(words)}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def flag(words: list[str], name: str) -> str | None:
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
    return values[-1] if values else None


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def readme_python_blocks(readme: pathlib.Path) -> list[str]:
    """The README's ```python blocks, each as one program."""
    return re.findall(r"^```python\n(.*?)^```", readme.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_readme_commands_run_in_the_clone(clone):
    commands = readme_commands(clone / "README.md")
    kinds = {words[1] for words in commands}
    assert kinds == set(SCRIPTS), f"README's bash blocks lack commands for {set(SCRIPTS) - kinds}"
    for words in commands:
        start = time.perf_counter()
        result = run_in_clone(clone, words)
        print(f"$ {shlex.join(words)}  ({time.perf_counter() - start:.1f} s)", flush=True)
        script, workdir = words[1], clone / flag(words, "workdir")
        shown = shlex.join(words)
        if script == "train.py":
            assert (workdir / "checkpoints" / "4").is_dir(), f"{shown}: no checkpoint at step 4"
            saved = json.loads((workdir / "config.json").read_text())
            if saved["data"]["path"]:
                assert (clone / saved["data"]["path"]).resolve().is_relative_to(clone.resolve())
        elif script == "eval.py" and "--sample" in words:
            prompt = flag(words, "prompt") or ""
            assert result.stdout.startswith(prompt) and len(result.stdout.strip()) > len(prompt.strip()), \
                f"{shown}: no sample printed: {result.stdout!r}"
        elif script == "eval.py":
            metrics = last_json(result.stdout)
            assert math.isfinite(metrics["loss"]) and metrics["tokens"] > 0, f"{shown}: {metrics}"
            if text := flag(words, "text"):  # scored the whole shipped file
                assert metrics["tokens"] > 0.99 * (clone / text).stat().st_size, f"{shown}: {metrics}"
        else:  # sweep.py
            plan = sweep_plan(clone, words + TOY["sweep.py"])
            with (workdir / "results.csv").open() as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == len(plan["configurations"]), \
                f"{shown}: {len(rows)} rows in results.csv for configurations {plan['configurations']}"
            by_seed = workdir / "results_by_seed.csv"
            if by_seed.exists():
                with by_seed.open() as f:
                    assert len(list(csv.DictReader(f))) == len(plan["points"]), \
                        f"{shown}: results_by_seed.csv lacks a row per point {plan['points']}"
            for name in plan["points"]:
                config_json = workdir / name / "config.json"
                assert config_json.is_file(), f"{shown}: point {name} has no workdir"
                data_path = json.loads(config_json.read_text())["data"]["path"]
                if data_path:
                    assert (clone / data_path).resolve().is_relative_to(clone.resolve()), \
                        f"{shown}: {name} trained on {data_path}"
    # The README's Python, as written, after its commands (it loads the run they trained).
    blocks = readme_python_blocks(clone / "README.md")
    assert blocks, "README.md has no ```python block"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=clone, env=environment(),
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, f"README's Python block failed:\n{block}\n{result.stderr[-3000:]}"



def readme_install_lines(readme: pathlib.Path) -> list[str]:
    """The commands of the ```bash block under the README's "## Install", comments dropped."""
    section = readme.read_text().split("## Install", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.slow
def test_readme_install_makes_mqa_importable_from_any_folder(clone, tmp_path):
    """The README's install block, run in the clone as written, except that the venv uses
    this interpreter's packages, pip and setuptools included (--system-site-packages
    --without-pip), and pip builds without an isolated build environment
    (PIP_NO_BUILD_ISOLATION), so every requirement is found installed and nothing is
    downloaded; then `import mqa` in another folder is the clone's package."""
    lines = readme_install_lines(clone / "README.md")
    assert lines[0].startswith("python3 -m venv .venv"), lines
    lines[0] = lines[0].replace("python3 -m venv .venv", f"{sys.executable} -m venv --system-site-packages --without-pip .venv", 1)
    script = "set -e\n" + "\n".join(lines)
    env = {**environment(), "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"README's install block failed:\n{script}\n{result.stderr[-3000:]}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", "import mqa; print(mqa.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert found.returncode == 0, found.stderr
    assert pathlib.Path(found.stdout.strip()).resolve().is_relative_to(clone.resolve()), found.stdout
