"""The Python API in a few lines: generate with PSA on the built-in tiny model, then dense with
the same seed, and compare (speedup, density, PSNR / SSIM).

    python samples/generate_tiny.py [OUT_DIR]

Both runs here are first calls (no warm-up), so the speedup includes one-off costs;
``vdiff-sparse generate`` runs an untimed warm-up generation first. The tiny model is random
(noise-like videos) and downloads nothing; for a real model use
``SparseVideoPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")`` and, for its
settings, ``pipe.make_processor("psa", preset="wan2.1-1.3b")``.
"""

import json
import sys
from pathlib import Path

from vdiff_sparse.pipelines import SparseVideoPipeline
from vdiff_sparse.pipelines.generate import save_video
from vdiff_sparse.pipelines.report import compare, report_table

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_psa")
pipe = SparseVideoPipeline.tiny(seed=0)
size = dict(num_frames=9, height=128, width=128, num_inference_steps=4, seed=0)

pipe.set_attn_processor(pipe.make_processor("psa", overrides={"dense_steps": 1}))  # stats on by default
sparse = pipe("a red cat runs on the beach", **size)
pipe.set_attn_processor(pipe.make_processor("dense"))
dense = pipe("a red cat runs on the beach", **size)
pipe.set_attn_processor(None)  # back to the model's own attention

report = compare(sparse, dense)
save_video(sparse.frames, out / "psa.mp4")
(out / "report.json").write_text(json.dumps(report, indent=2))
print(report_table(report))
print("per-layer density:", {k: round(v, 3) for k, v in report["per_layer_density"].items()})
