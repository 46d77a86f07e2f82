"""Probe: does CleanAI prune real models it has no test for?

For each model (random weights, nothing downloaded) the probe builds it, prunes it with
``StructuredPruner(model, x, pruning_ratio=0.5).step()`` (``--ratio`` sets another) and checks
what a user notices:

* the forward output has the same structure (keys, tuple lengths) and shapes as before,
  and is finite;
* backward runs through the pruned model and reaches its parameters;
* the model still runs in train mode (batch 2);
* the parameter count dropped.

It also reports how much of the model CleanAI refused to touch: the fraction of channels in
protected groups (model outputs left out, they are never pruned) when the pruner is built and
after its step (``after``: with what the fallback protected once a pruned forward failed), the
most common reasons, and the fallback's warnings.

Families: timm CNNs and vision transformers, torchvision segmentation / video / detection
backbones, Hugging Face transformers (tiny random configs). Run:

    python benchmarks/probe_models.py [--quick] [--only NAME ...] [--family timm|tv|hf]
                                      [--limit SECONDS] [--ratio 0.5]
                                      [--out docs/probe_models_table.md]

``--quick`` runs one or two models per family (about a minute). The table at the end has one row
per model: parameters before -> after, protected %, seconds, status, the top protection reason.
A model that needs longer than ``--limit`` seconds (default 60) is stopped and marked ``slow``.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import cleanai
from cleanai.utils import count_params

Case = Tuple[nn.Module, Any, Optional[Callable]]  # model, example inputs, forward_fn


# --- model zoo ----------------------------------------------------------------------------

def _img(size: int, batch: int = 1, frames: Optional[int] = None) -> torch.Tensor:
    if frames:
        return torch.randn(batch, 3, frames, size, size)
    return torch.randn(batch, 3, size, size)


TIMM = {  # name: (input size, create_model kwargs)
    "seresnet18": (64, {}), "ecaresnet26t": (64, {}), "skresnet18": (64, {}),
    "resnest14d": (64, {}), "res2net50_14w_8s": (64, {}), "res2next50": (64, {}),
    "efficientnet_b0": (64, {}), "mixnet_s": (64, {}), "ghostnet_050": (64, {}),
    "ghostnetv2_100": (64, {}), "hardcorenas_a": (64, {}), "rexnet_100": (64, {}),
    "lcnet_050": (64, {}), "tinynet_e": (64, {}), "mobilenetv4_conv_small": (64, {}),
    "mobilenetv4_hybrid_medium": (64, {}), "repghostnet_050": (64, {}),
    "dla34": (64, {}), "dla60x_c": (64, {}), "dpn48b": (64, {}),
    "hrnet_w18_small": (64, {}), "cspdarknet53": (64, {}), "cspresnet50": (64, {}),
    "cs3darknet_focus_s": (64, {}), "darknet17": (64, {}), "ese_vovnet19b_dw": (64, {}),
    "repvgg_a0": (64, {}), "mobileone_s0": (64, {}), "gernet_s": (64, {}),
    "regnetx_002": (64, {}), "regnety_002": (64, {}), "nf_resnet26": (64, {}),
    "nf_regnet_b0": (64, {}), "dm_nfnet_f0": (64, {}),
    "inception_v3": (96, {}), "inception_v4": (96, {}), "xception41": (96, {}),
    "legacy_xception": (96, {}), "selecsls42b": (64, {}), "tresnet_m": (64, {}),
    "hgnetv2_b0": (64, {}), "fasternet_t0": (64, {}), "starnet_s050": (64, {}),
    "convnextv2_atto": (64, {}), "inception_next_tiny": (64, {}),
    "fastvit_t8": (64, {}), "efficientformer_l1": (224, {}),
    "efficientformerv2_s0": (224, {}), "poolformer_s12": (64, {}),
    "poolformerv2_s12": (64, {}), "convmixer_768_32": (64, {}),
    "edgenext_xx_small": (64, {}), "mobilevit_xxs": (64, {}), "mobilevitv2_050": (64, {}),
    "efficientvit_b0": (64, {}), "efficientvit_m0": (224, {}),
    "coatnet_nano_rw_224": (224, {}), "coat_lite_tiny": (64, {"img_size": 64}),
    "pvt_v2_b0": (64, {}), "twins_svt_small": (64, {}), "twins_pcpvt_small": (64, {}),
    "cait_xxs24_224": (64, {"img_size": 64, "depth": 4}),
    "xcit_nano_12_p16_224": (64, {"img_size": 64, "depth": 4}),
    "beit_base_patch16_224": (64, {"img_size": 64, "depth": 2, "embed_dim": 96,
                                   "num_heads": 4}),
    "eva02_tiny_patch14_224": (56, {"img_size": 56, "depth": 2}),
    "crossvit_tiny_240": (240, {}), "nest_tiny": (64, {"img_size": 64}),
    "tnt_s_patch16_224": (64, {"img_size": 64, "depth": 2}),
    "volo_d1_224": (64, {"img_size": 64}), "gcvit_xxtiny": (224, {}),
    "levit_128s": (224, {}), "convit_tiny": (64, {"img_size": 64, "depth": 4}),
    "pit_ti_224": (224, {}), "mixer_s16_224": (64, {"img_size": 64}),
    "resmlp_12_224": (64, {"img_size": 64}), "gmlp_ti16_224": (64, {"img_size": 64}),
    "tiny_vit_5m_224": (224, {}), "davit_tiny": (64, {}), "focalnet_tiny_srf": (64, {}),
    "maxvit_nano_rw_256": (256, {}), "swinv2_cr_tiny_224": (224, {}),
    "hiera_tiny_224": (224, {}),
    "vit_pwee_patch16_reg1_gap_256": (64, {"img_size": 64}),
    "vit_small_patch16_rope_224": (64, {"img_size": 64,
                                                                      "depth": 2}),
    "bat_resnext26ts": (256, {}), "halonet26t": (256, {}), "botnet26t_256": (256, {}),
    "lambda_resnet26t": (256, {}), "visformer_tiny": (224, {}), "mambaout_femto": (64, {}),
    "rdnet_tiny": (64, {}), "sequencer2d_s": (64, {}),
    "vit_relpos_small_patch16_224": (64, {"img_size": 64, "depth": 2}),
    "maxxvit_rmlp_nano_rw_256": (256, {}), "nextvit_small": (64, {}),
}


def timm_case(name: str) -> Case:
    import timm
    size, kw = TIMM[name]
    model = timm.create_model(name, pretrained=False, **kw)
    return model, _img(size), None


def _dict_out(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


TV: Dict[str, Callable[[], Case]] = {}


def _tv(name: str, x: Callable[[], torch.Tensor], sub: Optional[str] = None, **kw) -> None:
    def build() -> Case:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, **kw)
        if sub:
            model = model.get_submodule(sub)
        return model, x(), None
    TV[name + (f".{sub}" if sub else "")] = build


_tv("fcn_resnet50", lambda: _img(64), weights_backbone=None, aux_loss=True)
_tv("deeplabv3_mobilenet_v3_large", lambda: _img(64), weights_backbone=None, aux_loss=True)
_tv("lraspp_mobilenet_v3_large", lambda: _img(64), weights_backbone=None)
_tv("r3d_18", lambda: _img(32, frames=4))
_tv("mc3_18", lambda: _img(32, frames=4))
_tv("r2plus1d_18", lambda: _img(32, frames=4))
_tv("s3d", lambda: _img(224, frames=16))
_tv("swin3d_t", lambda: _img(64, frames=4))
_tv("mvit_v2_s", lambda: _img(224, frames=16))
_tv("fasterrcnn_mobilenet_v3_large_fpn", lambda: _img(128), sub="backbone",
    weights_backbone=None)
_tv("retinanet_resnet50_fpn", lambda: _img(128), sub="backbone", weights_backbone=None)
_tv("ssdlite320_mobilenet_v3_large", lambda: _img(128), sub="backbone", weights_backbone=None)
_tv("raft_small", lambda: (_img(128), _img(128)))
_tv("shufflenet_v2_x0_5", lambda: _img(64))  # channel_shuffle + chunk


def _detector() -> Case:
    """The whole Faster R-CNN on one image. In eval mode the output is a list of dicts whose
    box count depends on the weights, so ``forward_fn`` keeps the keys and trailing dims
    (``boxes: [0, 4]``); in train mode it returns the losses for one target box."""
    import torchvision
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None)

    def forward_fn(m, inputs):
        if m.training:  # the losses, against one box per image
            images = inputs[0]
            targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 60.0]]),
                        "labels": torch.tensor([1])} for _ in images]
            return m(images, targets)
        return [{k: v.reshape(-1, *v.shape[1:])[:0] for k, v in d.items()} for d in m(*inputs)]
    return model, ([torch.rand(3, 128, 128)],), forward_fn


TV["fasterrcnn_mobilenet_v3_large_fpn"] = _detector


def _hf_text(config_cls: str, model_cls: str, vocab: int = 100, **cfg) -> Callable[[], Case]:
    def build() -> Case:
        import transformers
        config = getattr(transformers, config_cls)(vocab_size=vocab, **cfg)
        model = getattr(transformers, model_cls)(config)
        return model, {"input_ids": torch.randint(3, vocab, (2, 8))}, None
    return build


def _hf_pixels(config_cls: str, model_cls: str, size: int = 32, **cfg) -> Callable[[], Case]:
    def build() -> Case:
        import transformers
        config = getattr(transformers, config_cls)(**cfg)
        model = getattr(transformers, model_cls)(config)
        return model, {"pixel_values": torch.randn(2, config.num_channels, size, size)}, None
    return build


def _hf_audio(config_cls: str, model_cls: str, key: str, shape: Tuple[int, ...],
              **cfg) -> Callable[[], Case]:
    def build() -> Case:
        import transformers
        config = getattr(transformers, config_cls)(**cfg)
        model = getattr(transformers, model_cls)(config)
        return model, {key: torch.randn(*shape)}, None
    return build


def _hf_clip_text() -> Case:
    import transformers
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=16)
    return transformers.CLIPTextModel(cfg), {"input_ids": torch.randint(3, 100, (2, 8))}, None


def _hf_seq2seq(config_cls: str, model_cls: str, **cfg) -> Callable[[], Case]:
    def build() -> Case:
        import transformers
        config = getattr(transformers, config_cls)(vocab_size=100, **cfg)
        model = getattr(transformers, model_cls)(config)
        ids = torch.randint(3, 100, (2, 8))
        return model, {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, None
    return build


_T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_DEC = dict(_T, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
HF: Dict[str, Callable[[], Case]] = {
    "hf:gemma": _hf_text("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_DEC),
    "hf:gemma2": _hf_text("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **_DEC),
    "hf:mistral": _hf_text("MistralConfig", "MistralForCausalLM", **_DEC),
    "hf:phi3": _hf_text("Phi3Config", "Phi3ForCausalLM", **_DEC),
    "hf:mixtral": _hf_text("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                           num_experts_per_tok=2, **_DEC),
    "hf:qwen2_moe": _hf_text("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=32, **_DEC),
    "hf:olmoe": _hf_text("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                         **_DEC),
    "hf:gpt_oss": _hf_text("GptOssConfig", "GptOssForCausalLM", num_local_experts=4,
                           num_experts_per_tok=2, head_dim=8,
                           layer_types=["full_attention", "full_attention"], **_DEC),
    "hf:falcon": _hf_text("FalconConfig", "FalconForCausalLM", hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                          eos_token_id=0),
    "hf:bloom": _hf_text("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0),
    "hf:opt": _hf_text("OPTConfig", "OPTForCausalLM", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                       max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1),
    "hf:gptj": _hf_text("GPTJConfig", "GPTJForCausalLM", n_embd=32, n_layer=2, n_head=4,
                        rotary_dim=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "hf:gpt_neox": _hf_text("GPTNeoXConfig", "GPTNeoXForCausalLM", **_T, bos_token_id=0,
                            eos_token_id=0),
    "hf:mpt": _hf_text("MptConfig", "MptForCausalLM", d_model=32, n_heads=4, n_layers=2,
                       expansion_ratio=2, max_seq_len=64),
    "hf:deberta_v2": _hf_text("DebertaV2Config", "DebertaV2Model", **_T,
                              relative_attention=True, position_buckets=8,
                              pos_att_type=["p2c", "c2p"]),
    "hf:albert": _hf_text("AlbertConfig", "AlbertModel", embedding_size=16, **_T),
    "hf:electra": _hf_text("ElectraConfig", "ElectraForPreTraining", embedding_size=16, **_T),
    "hf:xlm_roberta": _hf_text("XLMRobertaConfig", "XLMRobertaModel", pad_token_id=1, **_T),
    "hf:distilbert": _hf_text("DistilBertConfig", "DistilBertModel", dim=32, n_layers=2,
                              n_heads=4, hidden_dim=64),
    "hf:t5": _hf_seq2seq("T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8,
                         d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "hf:bart": _hf_seq2seq("BartConfig", "BartForConditionalGeneration", d_model=32,
                           encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_position_embeddings=64),
    "hf:clip_text": _hf_clip_text,
    "hf:clip_vision": _hf_pixels("CLIPVisionConfig", "CLIPVisionModel", size=32,
                                 image_size=32, patch_size=8, **_T),
    "hf:swin": _hf_pixels("SwinConfig", "SwinModel", size=32, image_size=32, patch_size=4,
                          embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "hf:convnext": _hf_pixels("ConvNextConfig", "ConvNextModel", size=32, num_stages=2,
                              hidden_sizes=[16, 32], depths=[1, 1]),
    "hf:resnet": _hf_pixels("ResNetConfig", "ResNetModel", size=32, embedding_size=16,
                            hidden_sizes=[16, 32], depths=[1, 1]),
    "hf:mobilevit": _hf_pixels("MobileViTConfig", "MobileViTModel", size=64, image_size=64),
    "hf:segformer": _hf_pixels("SegformerConfig", "SegformerForSemanticSegmentation",
                               size=64, num_encoder_blocks=2, depths=[1, 1],
                               sr_ratios=[2, 1], hidden_sizes=[16, 32],
                               num_attention_heads=[1, 2], decoder_hidden_size=32,
                               strides=[4, 2], patch_sizes=[7, 3]),
    "hf:dinov2": _hf_pixels("Dinov2Config", "Dinov2Model", size=28, image_size=28,
                            patch_size=7, **_T),
    "hf:whisper_encoder": _hf_audio("WhisperConfig", "WhisperForAudioClassification",
                                    "input_features", (2, 16, 64), num_mel_bins=16,
                                    d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                    encoder_ffn_dim=64, max_source_positions=32),
    "hf:wav2vec2": _hf_audio("Wav2Vec2Config", "Wav2Vec2Model", "input_values", (2, 800),
                             **_T, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                             num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                             feat_extract_norm="group"),
}

QUICK = ["seresnet18", "ghostnet_050", "efficientformerv2_s0", "xcit_nano_12_p16_224",
         "deeplabv3_mobilenet_v3_large", "r3d_18", "hf:falcon", "hf:wav2vec2"]


def all_cases() -> Dict[str, Tuple[str, Callable[[], Case]]]:
    cases: Dict[str, Tuple[str, Callable[[], Case]]] = {}
    for name in TIMM:
        cases[name] = ("timm", lambda name=name: timm_case(name))
    for name, build in TV.items():
        cases[name] = ("tv", build)
    for name, build in HF.items():
        cases[name] = ("hf", build)
    return cases


# --- checks ---------------------------------------------------------------------------------

def leaves(out: Any, path: str = "") -> List[Tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) model output, with where it sits."""
    if isinstance(out, torch.Tensor):
        return [(path or "out", out)]
    if isinstance(out, dict):  # also Hugging Face ModelOutput
        return [t for k, v in out.items() for t in leaves(v, f"{path}.{k}")]
    if isinstance(out, (list, tuple)):
        return [t for i, v in enumerate(out) for t in leaves(v, f"{path}[{i}]")]
    return []


def run(model: nn.Module, x: Any, forward_fn: Optional[Callable]) -> Any:
    if forward_fn is not None:
        return forward_fn(model, x)
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def batch_of_two(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x]) if x.shape[0] == 1 else x
    if isinstance(x, dict):
        return {k: batch_of_two(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(batch_of_two(v) for v in x)
    return x


def protection(graph: "cleanai.DependencyGraph", sizes: Optional[Dict[int, int]] = None
               ) -> Tuple[float, List[Tuple[str, int]]]:
    """Protected channels as a fraction of all channels outside the model's outputs, and the
    most common reasons; ``sizes`` (group id -> size before a step) counts a pruned graph's
    channels as they were."""
    total = protected = 0
    reasons: collections.Counter = collections.Counter()
    for g in graph.groups:
        if g.reasons.get("model output", 0) >= g.size:
            continue
        total += (sizes or {}).get(g.id, g.size)
        protected += int(g.protected.sum())
        for why, n in g.reasons.items():
            if why != "model output":
                reasons[why] += n
    return protected / max(total, 1), reasons.most_common(3)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def probe(name: str, build: Callable[[], Case], limit: float, ratio: float = 0.5) -> Dict[str, Any]:
    row: Dict[str, Any] = {"model": name, "before": 0, "after": 0, "protected": float("nan"),
                           "protected_after": float("nan"),
                           "seconds": 0.0, "status": "ok", "note": ""}
    start = time.perf_counter()
    stage = "build"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(limit))
    try:
        torch.manual_seed(0)
        model, x, forward_fn = build()
        model.eval()
        row["before"] = count_params(model)
        stage = "forward"
        with torch.no_grad():
            before = [(k, t.shape) for k, t in leaves(run(model, x, forward_fn))]
        stage = "prune"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = cleanai.StructuredPruner(model, x, pruning_ratio=ratio, forward_fn=forward_fn)
            frac, top = protection(pruner.graph)
            row["protected"] = frac
            row["note"] = "; ".join(f"{n}: {why[:70]}" for why, n in top)
            pruner.step()
            row["protected_after"] = protection(pruner.graph, pruner.original_size)[0]
        fallbacks = [str(w.message) for w in caught if " no longer runs when " in str(w.message)]
        row["after"] = count_params(model)
        stage = "forward after"
        out = run(model, x, forward_fn)
        after = [(k, t.shape) for k, t in leaves(out)]
        problems = []
        if [k for k, _ in after] != [k for k, _ in before]:
            problems.append(f"output keys {[k for k, _ in before]} -> {[k for k, _ in after]}")
        else:
            problems += [f"{k} {tuple(a)} -> {tuple(b)}" for (k, a), (_, b) in zip(before, after)
                         if a != b]
        floats = [t for _, t in leaves(out) if t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in floats):
            problems.append("non-finite output")
        stage = "backward"
        sum(t.float().sum() for t in floats if t.requires_grad).backward()
        if not any(p.grad is not None for p in model.parameters()):
            problems.append("no gradient reached the parameters")
        stage = "train mode"
        model.train()
        leaves(run(model, batch_of_two(x), forward_fn))
        if row["after"] >= row["before"]:
            problems.append("parameter count did not drop")
        if fallbacks:
            row["note"] = "FALLBACK " + " | ".join(f[:150] for f in fallbacks) + "; " + row["note"]
        if problems:
            row["status"] = "WRONG"
            row["note"] = "; ".join(problems) + "; " + row["note"]
        elif fallbacks:
            row["status"] = "fallback"
    except Timeout:
        row["status"] = "slow"
        row["note"] = f"stopped after {limit:.0f} s in {stage}"
    except Exception as exc:  # a probe reports every failure and goes on
        row["status"] = "FAIL" if stage != "build" and stage != "forward" else "skip"
        row["note"] = f"{stage}: {type(exc).__name__}: {str(exc)[:300]}"
        if os.environ.get("PROBE_TRACEBACK"):
            traceback.print_exc()
    finally:
        signal.alarm(0)
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few models per family")
    parser.add_argument("--only", nargs="*", help="model names to run")
    parser.add_argument("--family", choices=["timm", "tv", "hf"], help="one family only")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning_ratio (default 0.5)")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cases = all_cases()
    names = args.only or (QUICK if args.quick else list(cases))
    unknown = [n for n in names if n not in cases]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {sorted(cases)}")
    rows = []
    for name in names:
        family, build = cases[name]
        if args.family and family != args.family:
            continue
        row = probe(name, build, args.limit, args.ratio)
        rows.append(row)
        print(f"{row['model']:<40} {row['status']:<8} {row['seconds']:6.1f}s  {row['note'][:200]}",
              flush=True)
    print()
    print(f"cleanai {cleanai.__file__}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'model':<40} {'params before -> after':>26} {'prot%':>6} {'after':>6} {'s':>6}  "
          f"status    note")
    for r in rows:
        params = f"{r['before']:,} -> {r['after']:,}"
        prot, after = (f"{100 * r[k]:5.1f}" if r[k] == r[k] else "    -"
                       for k in ("protected", "protected_after"))
        print(f"{r['model']:<40} {params:>26} {prot:>6} {after:>6} {r['seconds']:6.1f}  "
              f"{r['status']:<8}  {r['note'][:160]}")
    bad = [r["model"] for r in rows if r["status"] in ("FAIL", "WRONG")]
    print(f"\n{len(rows)} models: {len(rows) - len(bad)} without failure; failing: {bad}")
    if args.out:
        write_markdown(args.out, rows, " ".join(sys.argv[1:]))


def write_markdown(path: str, rows: List[Dict[str, Any]], argv: str) -> None:
    """The table as markdown, with the command and the code revision that produced it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import cleanai_revision
    lines = [f"Produced by `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/probe_models.py "
             f"{argv}` ({cleanai_revision()}, torch {torch.__version__}).", "",
             "| model | params before -> after | protected % | after step % | s | status | note |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        prot, after = (f"{100 * r[k]:.1f}" if r[k] == r[k] else "-"
                       for k in ("protected", "protected_after"))
        note = r["note"][:200].replace("|", "/")
        lines.append(f"| {r['model']} | {r['before']:,} -> {r['after']:,} | {prot} | {after} | "
                     f"{r['seconds']:.1f} | {r['status']} | {note} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
