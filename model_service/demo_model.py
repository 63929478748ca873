"""A demo model the project makes itself: a small Llama-architecture GGUF with random weights.

Its vocabulary is bytes (256 byte tokens plus ``<unk>``, ``<s>``, ``</s>``), so any text can be
tokenized, and its weights are drawn from a seeded generator, so the same arguments always
write the same file. Its output is noise by design: it exists so that a fresh machine serves
real inference through llama.cpp without downloading anything.

    python -m model_service.demo_model data/demo-llama.gguf [--seed 0] [--layers 2] [--embd 64]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

#: A plain ChatML template (Jinja, as llama.cpp and llama-cpp-python read it from the file).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DemoShape:
    """The size of the demo network."""

    layers: int = 2
    embd: int = 64
    heads: int = 4
    ff: int = 128
    context: int = 2048

    def check(self) -> None:
        if self.embd % self.heads:
            raise ValueError(f"embd: {self.embd} is not a multiple of heads {self.heads}")
        if min(self.layers, self.embd, self.heads, self.ff, self.context) < 1:
            raise ValueError("every dimension must be at least 1")


def write_demo_model(path: Path, seed: int = 0, shape: DemoShape | None = None) -> Path:
    """Write the demo GGUF to ``path`` (atomically) and return it."""
    import gguf
    import numpy as np

    shape = shape or DemoShape()
    shape.check()
    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"] + [
        f"<0x{b:02X}>".encode() for b in range(256)
    ]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [
        gguf.TokenType.BYTE
    ] * 256
    n_vocab = len(tokens)
    e, f = shape.embd, shape.ff

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(f"modelpool demo (seed {seed}, {shape.layers}x{e})")
    w.add_context_length(shape.context)
    w.add_embedding_length(e)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(f)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.heads)
    w.add_rope_dimension_count(e // shape.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    def weight(*dims: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(n_vocab, e, scale=1.0))
    for i in range(shape.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(e, e))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(f, e))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(f, e))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(e, f))
    w.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, e, scale=1.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=DemoShape.layers)
    p.add_argument("--embd", type=int, default=DemoShape.embd)
    p.add_argument("--heads", type=int, default=DemoShape.heads)
    p.add_argument("--ff", type=int, default=DemoShape.ff)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    if args.path.exists() and not args.force:
        print(f"{args.path} exists (use --force to write it again)")
        return 0
    try:
        shape = DemoShape(args.layers, args.embd, args.heads, args.ff)
        out = write_demo_model(args.path, args.seed, shape)
    except ImportError as exc:
        print(
            f"the demo model needs the gguf package: pip install 'modelpool[llamacpp]' ({exc})",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        print(f"invalid shape: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
