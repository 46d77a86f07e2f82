"""Probe: every causal-LM family of the installed transformers, tiny random config, pruned.

For each model type ``transformers`` maps to a causal LM, the probe builds it from
``AutoConfig.for_model(type, **TINY)`` (random weights, nothing downloaded), checks that it runs
on token ids (with ``use_cache=False``), prunes it with ``StructuredPruner(model,
{"input_ids": ids, "use_cache": False}, pruning_ratio=0.5).step()`` and reports:

* parameters before -> after, and the share of prunable channels protected;
* whether the pruned model runs and keeps its output shape;
* whether CleanAI warned that ``model.config`` cannot describe the pruned model, and, when it
  did not, whether ``save_pretrained`` -> ``from_pretrained`` gives the same logits (the
  largest difference);
* the fallback's and the unknown-op warnings, shortened.

When the tiny config does not build or run, it is tried without ``head_dim``, then with the
widths of :data:`EXTRA` (rotary dims, latent attention, experts), then with as many key/value
heads as query heads; the "tiny config" column says which. A type none of them runs is listed
as ``skip`` with the first reason (a config that needs other fields, a model that needs other
inputs). Each type runs in
a forked process, stopped after ``--limit`` seconds (``slow``).

    python benchmarks/probe_hf_families.py [--only TYPE ...] [--limit SECONDS]
                                           [--out docs/probe_hf_families.md]
"""
from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
import warnings
from typing import Dict, List

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cleanai  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=0,
            eos_token_id=0, head_dim=8, n_embd=32, n_layer=2, n_head=4, d_model=32,
            num_layers=2, n_positions=64, max_position_embeddings=64)


# widths some families need besides TINY: rotary dims (GPT-J, CodeGen), multi-head latent
# attention (DeepSeek-V2/V3 and their kin) and routed experts; distinct values, so that each
# split's sizes name one attribute
EXTRA = dict(rotary_dim=4, qk_rope_head_dim=6, qk_nope_head_dim=8, v_head_dim=8,
             kv_lora_rank=20, q_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=16, n_group=1, topk_group=1)
# state-space mixers (Mamba-2 and its hybrids) under each family's names: 8 heads of 8 =
# expand x hidden, one group of B and C, a state of 8, chunks of 4
SSM = dict(num_heads=8, expand=2, n_groups=1, state_size=8, chunk_size=4, time_step_rank=4,
           mamba_n_heads=8, mamba_num_heads=8, mamba_d_head=8, mamba_head_dim=8,
           mamba_headdim=8, mamba_n_groups=1, mamba_ngroups=1, mamba_d_state=8,
           ssm_state_size=8, mamba_expand=2, mamba_chunk_size=4, mamba_d_ssm=64,
           n_mamba_heads=8)
# Zamba's layer types name a shared attention block "hybrid"
HYBRID = dict(SSM, layers_block_type=["mamba", "hybrid"])
# tried in turn until the model builds and runs: TINY; without head_dim (a derived property
# in some configs); with EXTRA; with one key/value head per query head as well; with SSM
# (and HYBRID)
VARIANTS = [((), False), (("head_dim",), False), (("head_dim",), True),
            (("head_dim", "num_key_value_heads"), True), ((), "ssm"), ((), "hybrid")]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _isolated(model_type: str, limit: int) -> Dict[str, str]:
    """``probe(model_type)`` in a forked process: a model that takes all the memory (the
    default vision towers of multimodal types) or crashes takes only its own row."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
        try:
            send.send(probe(model_type))
        except _Timeout:
            send.send(None)

    proc = ctx.Process(target=child)
    proc.start()
    row = receive.recv() if receive.poll(limit + 30) else None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        why = f"over {limit} s" if proc.exitcode in (0, None, -9) else \
            f"the process ended with code {proc.exitcode}"
        row = {"type": model_type, "params": "", "protected": "", "status": "slow",
               "reload": "", "note": why, "config": ""}
    return row


def probe(model_type: str) -> Dict[str, str]:
    from transformers import AutoConfig, AutoModelForCausalLM
    row = {"type": model_type, "params": "", "protected": "", "status": "", "reload": "",
           "note": "", "config": ""}
    first = None
    for drop, extra in VARIANTS:
        try:
            kwargs = {k: v for k, v in TINY.items() if k not in drop}
            widths = {"ssm": SSM, "hybrid": HYBRID}.get(extra, EXTRA if extra else {})
            config = AutoConfig.for_model(model_type, **{**kwargs, **widths})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
            ids = torch.randint(3, 100, (2, 8))
            with torch.no_grad():
                before = model(ids, use_cache=False).logits
            break
        except _Timeout:
            raise
        except Exception as exc:
            first = first or f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    else:
        row.update(status="skip", note=first)
        return row
    tried = [f"no {'/'.join(drop)}" if drop else ""] + (
        ["SSM widths"] if extra in ("ssm", "hybrid") else ["EXTRA widths"] if extra else [])
    row["config"] = ", ".join(t for t in tried if t)
    n0 = sum(p.numel() for p in model.parameters())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = cleanai.StructuredPruner(model, {"input_ids": ids, "use_cache": False},
                                              pruning_ratio=0.5)
            groups = [g for g in pruner.graph.groups if set(g.reasons) != {"model output"}]
            held = sum(int(g.protected.sum()) for g in groups)
            pruner.step()
        with torch.no_grad():
            after = model(ids, use_cache=False).logits
        said = [str(w.message) for w in caught]
        ok = after.shape == before.shape and bool(torch.isfinite(after).all())
        row.update(params=f"{n0:,} -> {sum(p.numel() for p in model.parameters()):,}",
                   protected=f"{100 * held / max(1, sum(g.size for g in groups)):.0f}",
                   status="ok" if ok else "wrong output")
        if any("model.config" in w or "unevenly" in w for w in said):
            row["reload"] = "warned"
        else:
            try:
                with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.save_pretrained(d)
                    again = type(model).from_pretrained(d).eval()
                    with torch.no_grad():
                        diff = (again(ids, use_cache=False).logits - after).abs().max().item()
                row["reload"] = f"{diff:.0e}" if diff else "exact"
            except Exception as exc:  # the loader's own conversions (a padded vocabulary)
                row["reload"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
        notes = [w for w in said if "no longer runs" in w or "does not know" in w]
        row["note"] = "; ".join(n[:110] for n in notes[:2])
    except _Timeout:
        raise
    except Exception as exc:
        row.update(status="failed", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}")
    return row


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--limit", type=int, default=60, help="seconds per model type")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: List[Dict[str, str]] = []
    start = time.time()
    for t in args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        row = _isolated(t, args.limit)
        rows.append(row)
        print(" | ".join(row.values()), flush=True)
    import transformers
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skip", "slow", "failed",
                                                              "wrong output")}
    reload = sum(r["reload"] not in ("", "warned") and not r["reload"].startswith("fails")
                 for r in rows)
    refused = sum(r["reload"].startswith("fails") for r in rows)
    head = (f"Produced by `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/probe_hf_families.py"
            f"{' --out ' + args.out if args.out else ''}` (cleanai "
            f"{getattr(cleanai, '__version__', '?')}, transformers {transformers.__version__}, "
            f"{time.time() - start:.0f} s).\n\n"
            f"{len(rows)} causal-LM types: {counts['ok']} pruned and ran, {reload} of them "
            f"reloaded with `from_pretrained` ({refused} failed in the loader itself; the others "
            f"warned that the config cannot describe the pruned model), {counts['skip']} skipped (the tiny config or the plain forward "
            f"failed before pruning), {counts['slow']} slow, {counts['failed']} failed, "
            f"{counts['wrong output']} gave a wrong output.\n\n")
    table = ["| type | tiny config | params before -> after | protected % | status | "
             "reload (max diff) | note |", "|---|---|---:|---:|---|---|---|"]
    table += ["| " + " | ".join(r[k].replace("|", "/") for k in
                                ("type", "config", "params", "protected", "status", "reload",
                                 "note")) + " |"
              for r in rows]
    text = head + "\n".join(table) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text.split("\n\n")[1])


if __name__ == "__main__":
    main()
