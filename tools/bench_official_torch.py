"""Times the official PyTorch CRATE-MAE training step (the baseline of issue 5).

The official code is NOT part of this repository: export its `model/` folder
into an ignored folder and point --official_dir at it, e.g.

    git -C /work/.mirror/Ma-Lab-Berkeley+CRATE/repo archive HEAD model \
        | tar -x -C .official
    python tools/bench_official_torch.py --official_dir .official \
        --model mae_crate_base --modes eager,compile --json out.json

One step = forward under bf16 autocast, loss.backward(), fused AdamW (β₂ 0.95,
weight decay 0.05) and zero_grad, on a fixed batch of random N(0, 1) images
already on the GPU. After warm-up, `--windows` windows of `--steps` steps are
timed with a synchronisation at the end of each window only; the median
window's ms/step is reported with img/s, model TFLOP/s (3 × the analytic
forward FLOPs of `crate_mae_jax.tools.benchmark.forward_flops`, the same count the
JAX benchmark uses) and the peak memory torch allocated
(torch.cuda.max_memory_allocated). `compile` wraps the model in
torch.compile (default mode); the optimizer step stays eager (fused kernel).
The `sdpa_` modes (`sdpa_eager`, `sdpa_compile`) are the strongest honest
comparator: the official model with its attention computed by
`F.scaled_dot_product_attention(w, w, w)` (PyTorch's fused flash / memory-
efficient kernels), the one-line change a PyTorch user would make; the
function is the same (softmax(w wᵀ·scale) w, dropout 0).
`--batch_size` takes a comma list, so each comparator gets its best batch.
It needs timm (PatchEmbed, Block) and einops, as the official code does.
"""
import argparse
import json
import os
import statistics
import sys
import time

GIB = 1024**3

# Forward FLOPs per image at 224 px, mask ratio 0.75, from
# crate_mae_jax.tools.benchmark.forward_flops (official counting), so this script
# needs no JAX.
FWD_GFLOP = {"mae_crate_tiny": 7.24, "mae_crate_small": 15.04, "mae_crate_base": 25.63,
             "mae_crate_large": 87.57, "mae_vit_base": 32.37, "mae_vit_large": 72.1}


def use_sdpa(enabled: bool) -> None:
  """Swaps the official MSSA attention for PyTorch's fused SDPA (or back)."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from einops import rearrange  # pylint: disable=import-outside-toplevel
  from model.crate_ae import crate_decoder, crate_encoder  # pylint: disable=import-outside-toplevel

  def forward(self, x, return_attention=False, return_key=False):
    if return_attention or return_key:
      return self._official_forward(x, return_attention, return_key)
    w = rearrange(self.qkv(x), "b n (h d) -> b h n d", h=self.heads)
    out = F.scaled_dot_product_attention(w, w, w, scale=self.scale)
    return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

  for module in (crate_encoder, crate_decoder):
    cls = module.Attention
    if not hasattr(cls, "_official_forward"):
      cls._official_forward = cls.forward
    cls.forward = forward if enabled else cls._official_forward


def time_mode(args, mode: str, batch_size: int) -> dict:
  import torch
  sys.path.insert(0, os.path.abspath(args.official_dir))
  from model.crate_ae import crate_ae  # pylint: disable=import-outside-toplevel
  use_sdpa(mode.startswith("sdpa_"))
  compiled = mode.endswith("compile")
  # A fresh compile per mode: dynamo would otherwise reuse the graph it traced
  # for the previous mode (same code objects), attention and all.
  torch._dynamo.reset()  # pylint: disable=protected-access
  torch.manual_seed(0)
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()
  model = getattr(crate_ae, args.model)().cuda().train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          fused=True)
  fwd = torch.compile(model) if compiled else model
  imgs = torch.randn(batch_size, 3, args.image_size, args.image_size, device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss, _, _ = fwd(imgs, mask_ratio=args.mask_ratio)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  loss = step()
  torch.cuda.synchronize()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    loss = step()
  torch.cuda.synchronize()
  times = []
  for _ in range(args.windows):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
      loss = step()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / args.steps)
  med = statistics.median(times)
  img_s = batch_size / (med / 1e3)
  gflop = FWD_GFLOP.get(args.model) if args.image_size == 224 and args.mask_ratio == 0.75 else None
  row = dict(impl="official-pytorch", mode=mode, model=args.model, batch_size=batch_size,
             image_size=args.image_size, ms_step=round(med, 3), ms_min=round(min(times), 3),
             ms_max=round(max(times), 3), spread_pct=round(100 * (max(times) - min(times)) / med, 2),
             img_s=round(img_s, 1),
             model_tflops=None if gflop is None else round(3 * gflop * img_s / 1e3, 1),
             peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
             first_step_s=round(first_s, 1), loss=float(loss.detach()))
  del model, opt, fwd
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--official_dir", default=".official")
  ap.add_argument("--model", default="mae_crate_base")
  ap.add_argument("--modes", default="eager,compile,sdpa_compile",
                  help="comma list of eager, compile, sdpa_eager, sdpa_compile")
  ap.add_argument("--batch_size", default="256", help="comma list allowed")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--mask_ratio", type=float, default=0.75)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  import torch
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  env = dict(torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version(), device=torch.cuda.get_device_name(0))
  try:
    import timm
    env["timm"] = timm.__version__
  except ImportError:
    pass
  rows = []
  batches = [int(b) for b in args.batch_size.split(",") if b.strip()]
  for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
    for batch in batches:
      try:
        rows.append(time_mode(args, mode, batch))
      except Exception as e:  # pylint: disable=broad-except
        rows.append(dict(impl="official-pytorch", mode=mode, model=args.model,
                         batch_size=batch, error=f"{type(e).__name__}: {e}"[:500]))
        import torch  # pylint: disable=import-outside-toplevel
        torch.cuda.empty_cache()
      print(json.dumps(rows[-1]), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(env=env, rows=rows), f, indent=1)
  print(f"# {env}")
  print("| impl | mode | model | batch | img/s | ms/step | ±% | model TF/s | peak GiB |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    if "error" in r:
      print(f"| official-pytorch | {r['mode']} | {r['model']} | {r.get('batch_size')} | "
            f"ERROR: {r['error'][:100]} |")
      continue
    print(f"| official-pytorch | {r['mode']} | {r['model']} | {r['batch_size']} | "
          f"{r['img_s']:,.0f} | {r['ms_step']:.2f} | {r['spread_pct']:.1f} | "
          f"{r['model_tflops']} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
  main()
