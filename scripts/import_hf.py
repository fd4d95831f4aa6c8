"""Write a Hugging Face folder as an MTP folder (params.json + model.safetensors + tokenizer files),
once, for those who prefer that to starting training from the Hugging Face folder itself.

    python scripts/import_hf.py Qwen2.5-Coder-7B --out models/qwen_coder_mtp4 --n-future-tokens 4
    python scripts/import_hf.py exports/baseline_hf --out models/baseline_mtp    # an export: its own heads

A plain causal LM of a supported family (Llama 2 / CodeLlama / Llama 3.x, Qwen2 / Qwen2.5) gets
--n-future-tokens heads: its L blocks become trunk + head 0 and the others start as copies of the
last block (--new-heads copy_last) or random (random, with --seed). A folder written by
scripts/export_hf.py brings back its own heads and value head: the MTP folder it was exported from,
bit for bit. The weights keep their dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.data.tokenizer import find_tokenizer, load_tokenizer  # noqa: E402
from wmtp.models import load_mtp, save_mtp  # noqa: E402
from wmtp.models.hf import NewHeads, is_hf_folder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, metavar="HF_FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="the MTP folder to write")
    parser.add_argument("--n-future-tokens", type=int, default=0, help="heads (default: an export's own)")
    parser.add_argument("--new-heads", choices=["copy_last", "random"], default="copy_last")
    parser.add_argument("--seed", type=int, default=0, help="seed of --new-heads random")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        if not is_hf_folder(args.source):
            raise ValueError(f"{args.source}: not a Hugging Face model folder (config.json, no params.json)")
        heads = NewHeads(args.n_future_tokens, args.new_heads, args.seed)
        model = load_mtp(args.source, heads=heads)
        found = find_tokenizer(args.source)
        files = load_tokenizer(found).files if found is not None else ()
        out = save_mtp(args.out, model.args, model.state_dict(), overwrite=args.overwrite, extra_files=files)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        sys.exit(f"error: {exc}")
    print(f"imported {args.source} -> {out} ({model.args.n_future_tokens} heads)")


if __name__ == "__main__":
    main()
