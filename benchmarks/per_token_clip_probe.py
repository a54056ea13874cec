"""Would per-token clipping help dynamic scales? A probe on the README's protocol (docs/method.md §8).

    python benchmarks/per_token_clip_probe.py --calib ../shared/data/openwebtext/openwebtext_800.jsonl \
        --eval-text ../shared/data/wikitext-2-raw/wiki.test.raw

Calibrates `GlufxConfig(granularity="per_token")` on Gemma 3 270M, then evaluates its model with every
per-token INT8 linear computed in Python with the scale `c * absmax_t / 127` (rotation, rounding and the
INT8 weights as glufx's op has them; float32 accumulation, exact for these integer products up to
rounding of the sum), for c in a grid. c = 1.0 reproduces the native kernel's perplexity, which checks the
probe. glufx's kernels have no clip ratio: at 8 bits the probe finds nothing for one to gain.
"""
from __future__ import annotations

import argparse
import copy
from importlib.resources import files

import glufx
from glufx.eval import perplexity, wikitext2_windows
from glufx.models import load_gemma3_270m
from glufx.nn import Int8Linear
from glufx.ops import reference as R

DATA = files("glufx") / "resources"


def clipped_forward(clip: float, native):
    def forward(self, x):
        if self.granularity != "per_token":
            return native(self, x)
        x2d = x.reshape(-1, x.shape[-1]).float()  # x2d: [M, K]
        if self.rot_block:
            x2d = R._rotate_rows(x2d, self.rot_block, self.rot_signs)
        s = R._scale_from_absmax(clip * x2d.abs().amax(1))[:, None]  # s: [M, 1]
        y = R.fake_quantize(x2d, s) @ self.w_q.float().T * self.w_scale[None, :]  # y: [M, N]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)
    return forward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=str(DATA / "calib_openwebtext.jsonl"))
    ap.add_argument("--eval-text", default=str(DATA / "wikitext2_test_excerpt.txt"))
    ap.add_argument("--clips", default="1.0,0.95,0.9,0.85,0.8")
    args = ap.parse_args(argv)

    model, tok = load_gemma3_270m()
    windows = wikitext2_windows(args.eval_text, tok, 512, 16)
    fp = perplexity(model, windows, first_scored=2, progress=False)
    plan = glufx.calibrate(model, args.calib, glufx.GlufxConfig(granularity="per_token", progress=False), tokenizer=tok)
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    native = perplexity(q, windows, first_scored=2, progress=False)
    print(f"FP32 {fp:.3f}; glufx per-token, native kernel {native:.3f} ({100 * (native / fp - 1):+.2f} %)", flush=True)
    forward = Int8Linear.forward
    try:
        for clip in (float(c) for c in args.clips.split(",")):
            Int8Linear.forward = clipped_forward(clip, forward)
            ppl = perplexity(q, windows, first_scored=2, progress=False)
            print(f"per-token clip {clip:.2f}: {ppl:.3f} ({100 * (ppl / fp - 1):+.2f} %)", flush=True)
    finally:
        Int8Linear.forward = forward


if __name__ == "__main__":
    main()
