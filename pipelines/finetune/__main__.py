"""``python -m vdiff_sparse.pipelines.finetune`` (and ``accelerate launch -m ...``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
