"""Could per-page key bounds filter a decode step's scan before the codes?  Measured on real queries.

A first-stage filter in the style of Quest keeps, per page of consecutive rows and KV head, each
channel's minimum and maximum key; ``Σ_d max(q_d·min_d, q_d·max_d)`` bounds every score in the page.
A page can be skipped *safely* only when its bound lies ``ln(rows / ε)`` below the best score (then
all skipped pages together hold less than ``ε`` of the attention mass).  This script runs the model
once over an eval case plus its question, takes the question's last query of every layer, and
reports how many pages the safe rule skips, and how much mass Quest's heuristic (keep the pages
with the highest bounds) would keep.  Accuracy only, no timing: it runs on any machine.

Run: ``python -m benchmarks.bench_page_bounds [--length 7680] [--task multikey]``.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import DynamicCache

from hcmemory import cache_kwarg, load_model
from hcmemory.eval.runner import frame
from hcmemory.eval.tasks import TASKS, make_case

from .common import print_table, write_results

SINKS, RECENT = 4, 64
"""The exact rows of the ``hc`` presets, which no filter would touch."""


def last_queries(model, ids: torch.Tensor) -> tuple[DynamicCache, dict[int, torch.Tensor]]:
    """The cache after ``ids`` and each layer's post-RoPE query of the last token ``(q_heads, dim)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries: dict[int, torch.Tensor] = {}

    def grab(module, args, kwargs):
        hidden, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        q = module.q_proj(hidden[:, -1:]).view(1, 1, -1, module.head_dim).transpose(1, 2)
        queries[module.layer_idx] = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])[0][0, :, 0].float()

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    return cache, queries


def page_rows(keys: torch.Tensor, query: torch.Tensor, page: int, scaling: float, eps: float,
              keep: tuple[float, ...]) -> dict[str, float]:
    """For one layer: ``keys (heads, n, dim)`` of the compressed part, ``query (q_heads, dim)``."""
    heads, n, dim = keys.shape
    pages = n // page
    k = keys[:, :pages * page].view(heads, pages, page, dim)
    q = query.view(heads, -1, dim)  # (KV head, group, dim)
    scores = torch.einsum("hgd,hpkd->hgpk", q, k) * scaling
    low, high = k.amin(2), k.amax(2)
    bound = torch.maximum(q[:, :, None] * low[:, None], q[:, :, None] * high[:, None]).sum(-1) * scaling
    best = scores.flatten(2).amax(-1, keepdim=True)
    skippable = (bound < best - math.log(n / eps)).all(1)  # no query of the group needs the page
    mass = torch.softmax(scores.flatten(2), -1).mean(1).view(heads, pages, page).sum(-1)
    out = {"skipped_share": float(skippable.float().mean()), "skipped_mass": float((mass * skippable).sum(-1).max())}
    for share in keep:
        top = bound.amax(1).topk(max(1, int(share * pages)), dim=-1).indices
        covered = mass.gather(1, top).sum(-1)
        out[f"top{share:.0%}_mass_mean"] = float(covered.mean())
        out[f"top{share:.0%}_mass_worst"] = float(covered.min())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--length", type=int, default=7680)
    parser.add_argument("--task", default="multikey", choices=TASKS)
    parser.add_argument("--pages", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--eps", type=float, default=1e-2, help="mass the skipped pages may hold together")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    case = make_case(args.task, args.length, 0, tokenizer)
    before, after = frame(tokenizer)
    ids = tokenizer(before + case.context + "\n\n" + case.questions[0].text + after, return_tensors="pt",
                    add_special_tokens=False).input_ids
    cache, queries = last_queries(model, ids)
    dim = queries[0].shape[-1]
    keep = (0.25, 0.5)
    rows = []
    for page in args.pages:
        per_layer = [page_rows(layer.keys[0, :, SINKS:-RECENT].float(), queries[i], page, dim ** -0.5, args.eps,
                               keep) for i, layer in enumerate(cache.layers)]
        row = {"page": page, "rows": int(cache.layers[0].keys.shape[2]),
               "skipped_share": sum(r["skipped_share"] for r in per_layer) / len(per_layer),
               "skipped_mass": max(r["skipped_mass"] for r in per_layer)}
        for share in keep:
            row[f"top{share:.0%}_mass_mean"] = sum(r[f"top{share:.0%}_mass_mean"] for r in per_layer) / len(per_layer)
            row[f"top{share:.0%}_mass_worst"] = min(r[f"top{share:.0%}_mass_worst"] for r in per_layer)
        rows.append(row)
    path = write_results("page_bounds", rows, task=args.task, length=args.length, eps=args.eps)
    print_table(rows, list(rows[0]), f"Per-page key bounds as a first-stage filter ({args.task}, {args.length} "
                                     f"tokens, ε={args.eps}) — written to {path}")


if __name__ == "__main__":
    main()
