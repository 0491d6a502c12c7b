"""Video generation with sparse attention: pipeline, reports, plan pictures.

    from vdiff_sparse.pipelines import SparseVideoPipeline, GenerationResult
    from vdiff_sparse.pipelines.report import compare

    pipe = SparseVideoPipeline.tiny()               # or .from_pretrained(id_or_path) / .from_pipe(p)
    pipe.set_attn_processor(pipe.make_processor("psa"))
    sparse = pipe("a cat runs on the beach", num_frames=9, height=128, width=128,
                  num_inference_steps=4, seed=0)
    pipe.set_attn_processor(pipe.make_processor("dense"))
    dense = pipe("a cat runs on the beach", num_frames=9, height=128, width=128,
                 num_inference_steps=4, seed=0)
    report = compare(sparse, dense)                 # speedup, density, PSNR, SSIM, ...

Importing this package imports torch and numpy only; diffusers is loaded when a pipeline is
built.
"""

from .generate import GenerationResult, ModelNotAvailableError, SparseVideoPipeline, generation_processor

__all__ = ["GenerationResult", "ModelNotAvailableError", "SparseVideoPipeline", "generation_processor"]
