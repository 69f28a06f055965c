"""Typed configuration: `FreezeArguments`, the `freeze_*` fields (`FreezeTrainingArguments` adds the Trainer's, in
`.training`).

Every field's `help` text is the one documentation of the option: `--help`, the YAML and the option reference (docs/options.md) read it.
A set of choices is declared once, in the field's annotation (``Optional[Literal[SCHEDULE_UNITS]]``, the constant
defined next to its implementation in `hf_freeze.policies`), or by a registry (strategies, scores): the validator,
`--help`, the option page and `hf-freeze validate`'s suggestions read it from there. Values are checked in
`__post_init__` (`hf_freeze.config.checks`), so a bad YAML file fails when it is parsed, long before training.
This module holds the field declarations only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Literal, Optional, Union

from ..policies.adaptive import SELECT_ENDS, ProbeMode
from ..policies.common import CACHE_DTYPES, FROZEN_DTYPES
from ..policies.core import HEALTH_CHECK_MODES
from ..policies.name_patterns import PATTERN_SYNTAXES
from ..policies.parts import LAYER_STACKS
from ..policies.progress import SCHEDULE_UNITS
from ..policies.rotation import BLOCK_ORDERS
from ..policies.schedules import GRANULARITIES
from .checks import check_freeze_arguments
from .choices import score_help, strategy_help

__all__ = ["FreezeArguments", "freeze_fields"]


def _help(text: str) -> Dict[str, str]:
    # HfArgumentParser hands a field's metadata to `argparse.add_argument`: only argparse's own keys go here.
    return {"help": text}


@dataclass
class FreezeArguments:
    """The freezing policy, as `freeze_*` fields usable with `HfArgumentParser` (CLI and YAML).

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_freeze import FreezeArguments
    >>> (args,) = HfArgumentParser(FreezeArguments).parse_args_into_dataclasses(
    ...     ["--freeze_strategy", "bottom", "--freeze_layers", "0.5"])
    >>> args.freeze_strategy, args.freeze_layers
    ('bottom', 0.5)
    ```
    """

    freeze_strategy: str = field(
        default="none",
        metadata=_help(strategy_help()),
    )
    freeze_layers: Optional[float] = field(
        default=None,
        metadata=_help(
            "How many layers the strategy freezes ('bottom', 'top', 'adaptive'; for 'gradual_unfreezing', the bottom "
            "layers frozen at the start, default all): a whole number is a count of layers, a number in (0, 1) a fraction "
            "of them (rounded to the nearest count)."
        ),
    )
    freeze_interval: Optional[int] = field(
        default=None,
        metadata=_help("'interval': freeze every n-th layer (n >= 1; default 2)."),
    )
    freeze_interval_offset: Optional[int] = field(
        default=None,
        metadata=_help("'interval': index of the first frozen layer (0 <= offset < freeze_interval; default 0)."),
    )
    freeze_layer_indices: Optional[List[int]] = field(
        default=None,
        metadata=_help("'layers': indices of the layers to freeze; negative indices count from the last layer."),
    )
    freeze_patterns: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "'pattern': regular expressions over parameter names to freeze. Matched from the start of the name; "
            "a '.' between name parts is a literal dot, '.*' and '.+' keep their regex meaning."
        ),
    )
    freeze_trainable_patterns: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "'pattern': regular expressions over parameter names that stay trainable (axolotl's "
            "`unfrozen_parameters`). Alone, everything else is frozen; with `freeze_patterns`, they win. With "
            "`freeze_pattern_syntax: axolotl`, a trailing row range trains only those rows of a token embedding or "
            "expert tensor ('model.embed_tokens.weight$[32000:]')."
        ),
    )
    freeze_pattern_syntax: Optional[Literal[PATTERN_SYNTAXES]] = field(
        default=None,
        metadata=_help(
            "'pattern': how the patterns read. 'regex' (default): a regular expression from the start of the name, "
            "'.' between name parts literal, '.*', '.+', '.?' kept. 'axolotl': axolotl's `unfrozen_parameters` "
            "exactly: every '.' not followed by '+' is literal ('model.layers.*mlp' matches nothing), and a "
            "trailing '[start:end]' or '[index]' is a range of rows ('name$[:32000]'), trained exactly (frozen rows "
            "get no weight decay and no optimizer state)."
        ),
    )
    freeze_num_layers_unfrozen: Optional[int] = field(
        default=None,
        metadata=_help(
            "'trlx': trlx's `num_layers_unfrozen`. N > 0 trains the top N layers (the rest and the token "
            "embeddings are frozen), 0 freezes every layer and both embeddings, -1 freezes nothing."
        ),
    )
    freeze_trainable_layers: Optional[int] = field(
        default=None,
        metadata=_help(
            "'llama_factory': LLaMA-Factory's `freeze_trainable_layers`. N > 0 trains the last N layers, N < 0 "
            "the first |N|; everything else (embeddings, norms, head included) is frozen, except what "
            "`freeze_extra_modules` names."
        ),
    )
    freeze_num_new_blocks: Optional[int] = field(
        default=None,
        metadata=_help(
            "'llama_pro': the number of blocks LLaMA Pro's block expansion added (`hf-freeze expand "
            "--num-new-blocks`; LLaMA-Factory's `freeze_trainable_layers` with `use_llama_pro`). Only those blocks "
            "train, the last of each of N equal groups of layers, as in LLaMA-Factory; everything else is frozen, "
            "except what `freeze_extra_modules` names. N must divide the number of layers."
        ),
    )
    freeze_trainable_modules: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "'llama_factory', 'llama_pro': LLaMA-Factory's `freeze_trainable_modules`: which submodules of the "
            "trainable layers train, by the name that follows the layer index ('self_attn', 'mlp'; a name is "
            "matched as a prefix, as there); the rest of those layers is frozen. Default: ['all'], the whole "
            "layers. A name the layers do not have is refused, listing the ones they have."
        ),
    )
    freeze_extra_modules: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "'llama_factory', 'llama_pro': LLaMA-Factory's `freeze_extra_modules`: modules outside the layers that "
            "train too, named as the last part of their module path ('embed_tokens', 'norm', 'lm_head'). As in "
            "LLaMA-Factory, every parameter whose name contains the given text trains, inside the frozen layers "
            "included: 'norm' also trains every layer's 'input_layernorm' and 'post_attention_layernorm'. A name "
            "that is not such a module is refused, listing the ones there are."
        ),
    )
    freeze_embeddings: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Freeze the input embeddings (token, position, token-type). Default: the strategy's choice (frozen "
            "for 'bottom', 'head_only', 'bitfit', 'llama_factory', 'llama_pro'; the token embedding for 'trlx'; "
            "else trained)."
        ),
    )
    freeze_norm: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Freeze the non-layer modules after the layers that are not the head (final norm, pooler). "
            "Default: the strategy's choice (frozen for 'head_only', 'bitfit', 'llama_factory', 'llama_pro'; else "
            "trained)."
        ),
    )
    freeze_head: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Freeze the task head (LM head, classifier). Default: the strategy's choice (frozen for "
            "'llama_factory', 'llama_pro' and for 'trlx' with 0; else trained). A head tied to the input embeddings "
            "follows them."
        ),
    )
    freeze_respect_existing: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Parameters frozen before hf_freeze sees the model (by your own code) stay frozen unless the options name "
            "them as trainable (`freeze_trainable_patterns`, `freeze_trainable_layers`, `freeze_num_layers_unfrozen`, "
            "or `freeze_embeddings`/`freeze_norm`/`freeze_head: false`); the log lists them. Default: true; false "
            "lets the policy decide every parameter."
        ),
    )
    freeze_health_check: Optional[Literal[HEALTH_CHECK_MODES]] = field(
        default=None,
        metadata=_help(
            "After the first optimizer step and after every change of the frozen set, check that every trainable "
            "parameter received a gradient and every frozen one is unchanged (on a sample): 'warn' (default) logs "
            "what is wrong at WARNING, 'raise' stops training, 'off' skips the check."
        ),
    )
    freeze_frozen_modules_eval: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Run every module whose parameters are all frozen in eval mode (Lightning's `train_bn=False`): its "
            "BatchNorm keeps its running statistics and uses them, and its dropout is off, so a frozen module computes "
            "what it would at inference. Default: false (frozen modules follow the model's train/eval mode)."
        ),
    )
    freeze_cache_prefix: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Compute the frozen prefix (the embeddings and the frozen bottom layers) once per training example and "
            "train later epochs from its stored output, skipping those blocks. Needs a static policy that freezes the "
            "bottom layers ('bottom', ...) and `freeze_frozen_modules_eval: true`; exact when the prefix is "
            "deterministic (no dropout before the first trainable layer, no random input transformation per epoch). "
            "Default: false."
        ),
    )
    freeze_cache_memory_mb: Optional[float] = field(
        default=None,
        metadata=_help(
            "`freeze_cache_prefix`: how many MiB of stored hidden states stay in memory; the rest goes to a "
            "memory-mapped file in `freeze_cache_dir` (default 1024)."
        ),
    )
    freeze_cache_dir: Optional[str] = field(
        default=None,
        metadata=_help(
            "`freeze_cache_prefix`: the folder for the states beyond the memory budget. Default: "
            "'<output_dir>/frozen_prefix_cache' with the Trainer, a temporary folder in a plain loop."
        ),
    )
    freeze_cache_dtype: Optional[Literal[CACHE_DTYPES]] = field(
        default=None,
        metadata=_help(
            "`freeze_cache_prefix`: the precision of the stored states, 'float32', 'float16' or 'bfloat16' (half "
            "the size; the states are rounded once). Default: the model's own precision (exact)."
        ),
    )
    freeze_cache_keep: Optional[bool] = field(
        default=None,
        metadata=_help(
            "`freeze_cache_prefix`: keep the cache folder after training, for a later run of the same model, frozen "
            "prefix, precision and tokenizer (any other run rebuilds it). Default: false, the folder is deleted."
        ),
    )
    freeze_chunked_loss: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Causal language models: compute the training loss without holding the logits (batch x sequence x "
            "vocabulary) and their gradient in full: in chunks of 256 tokens on the CPU, with Liger-Kernel's fused "
            "linear cross entropy on a GPU (`pip install hf_freeze[gpu]`). The loss and the gradients are those of "
            "transformers' own loss, in the training's autocast dtype; training forward calls return `logits=None` "
            "(evaluation calls and calls without labels are untouched). Default: on on the CPU for causal LMs whose "
            "loss it can compute (a linear LM head, transformers' causal-LM loss, no logit soft-capping or scaling), "
            "off on a GPU (the model's own loss measured faster there); true also turns it on on a GPU and refuses "
            "other models; false turns it off. A loss already fused (`use_liger_kernel`) is left alone."
        ),
    )
    freeze_layer_paths: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "Dotted paths of the layer containers, in forward order, when they are not found automatically "
            "(e.g. 'model.layers' or 'encoder.block decoder.block')."
        ),
    )

    # -- multi-part models (vision-language, mixture-of-experts): parts found by discovery -------------------------
    freeze_layer_stack: Optional[Literal[LAYER_STACKS]] = field(
        default=None,
        metadata=_help(
            "Multi-part models: whose layers the layer strategies count and index ('bottom', 'top', 'interval', "
            "'layers', 'trlx', 'llama_factory', the schedules, 'adaptive'): 'language' (the language model's; "
            "default), 'vision' (the vision tower's) or 'all' (every stack, in forward order: the vision tower's "
            "first). `freeze_embeddings`, `freeze_norm` and `freeze_head` cover the counted part's blocks. With "
            "`freeze_layer_paths`, the named containers are counted (default 'all')."
        ),
    )
    freeze_component_paths: Optional[Union[dict, str]] = field(
        default=None,
        metadata=_help(
            "Multi-part models whose parts are not found automatically: the module path of each part, as a mapping "
            "with the keys 'vision_tower', 'audio_tower', 'projector' (a path or a list of paths) and "
            "'language_model', e.g. `{vision_tower: model.vision_tower, projector: model.multi_modal_projector, "
            "language_model: model.language_model}` (on the command line as JSON). Parts not named are found by the "
            "usual rule."
        ),
    )
    freeze_vision_tower: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Vision-language models: freeze (true) or train (false) the whole vision tower (LLaMA-Factory's name; "
            "ms-swift's `freeze_vit`). A projector inside it (Qwen2-VL's `visual.merger`) is not part of it. Default: "
            "frozen for 'llama_factory' (LLaMA-Factory's default); with another strategy that counts the language "
            "model's layers, frozen when the language model's input embeddings are (e.g. 'bottom', 'head_only', "
            "'trlx' with N >= 0), else trained. Refused on a model without a vision tower."
        ),
    )
    freeze_multi_modal_projector: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Vision-language models: freeze or train the projector between the vision tower and the language model "
            "(`multi_modal_projector`, `connector`, Qwen2-VL's `visual.merger`; ms-swift's `freeze_aligner`). "
            "Default: as `freeze_vision_tower`."
        ),
    )
    freeze_language_model: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Vision-language models: freeze (true) or train (false) the whole language model, its embeddings and LM "
            "head included, whatever the strategy chose for its layers (ms-swift's `freeze_llm`). Default: the "
            "strategy decides (LLaMA-Factory's default, false, when the strategy is 'none'). Refused on a "
            "single-part model."
        ),
    )
    freeze_vit: Optional[bool] = field(
        default=None, metadata=_help("ms-swift's name for `freeze_vision_tower` (setting both to different values is an error).")
    )
    freeze_aligner: Optional[bool] = field(
        default=None,
        metadata=_help("ms-swift's name for `freeze_multi_modal_projector` (setting both to different values is an error)."),
    )
    freeze_llm: Optional[bool] = field(
        default=None, metadata=_help("ms-swift's name for `freeze_language_model` (setting both to different values is an error).")
    )
    freeze_unused_modalities: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Multi-part models trained on text alone: true freezes the vision (audio) encoder and the projector, "
            "which text-only batches never reach, so that DDP needs no unused-parameter search (and they get no "
            "optimizer states). Unset: when the training data's columns (or its first example's keys) hold no image, "
            "video or audio input, training under DDP without `ddp_find_unused_parameters` is refused before it "
            "starts, naming this option, and otherwise a line says what it would save; false: no check."
        ),
    )
    freeze_router: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Mixture-of-experts models: freeze (true) or train (false) every layer's router (gate), whatever the "
            "strategy chose for its layer (false trains the routers of frozen layers too). Default: the router follows "
            "its layer. Refused on a dense model."
        ),
    )
    freeze_shared_experts: Optional[bool] = field(
        default=None,
        metadata=_help(
            "Mixture-of-experts models with shared experts (DeepSeek-V3, Qwen2-MoE): freeze or train every layer's "
            "shared experts, whatever the strategy chose for its layer. Default: they follow their layer. Refused on a "
            "model without shared experts."
        ),
    )

    # -- rows of frozen parameters (hf_freeze/policies/row_selection.py, hf_freeze/apply/trainable_rows.py) --------
    freeze_trainable_tokens: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "Token ids whose rows of the input embeddings and of the output embeddings (LM head, tied or not) train, "
            "while the rest of both matrices stays frozen (bit for bit: no weight decay, no optimizer state). 'new': "
            "the rows past the vocabulary size the model was loaded with (after `resize_token_embeddings`). "
            "Whatever the strategy chose for the embeddings and the head, they train only these rows."
        ),
    )
    freeze_trainable_experts: Optional[List[str]] = field(
        default=None,
        metadata=_help(
            "Mixture-of-experts models with fused expert tensors (transformers 5): experts whose slices train, the "
            "other experts of those tensors staying frozen bit for bit. An integer is that expert in every layer, "
            "'layer:expert' one layer's ('0:3'). Whatever the strategy chose for the routed experts, they train only "
            "these slices; the router follows `freeze_router`."
        ),
    )

    # -- schedules (hf_freeze/policies/schedules.py): the frozen set changes during training ----------------------
    freeze_schedule_unit: Optional[Literal[SCHEDULE_UNITS]] = field(
        default=None,
        metadata=_help(
            "Schedules: progress is counted in 'step' (optimizer steps) or 'epoch' (whole epochs; changes then "
            "happen as an epoch begins): the unit of `freeze_schedule_every`, and of the fractions of training of "
            "'progressive'. Default: 'epoch' for 'gradual_unfreezing' (as in ULMFiT and Lightning), else 'step'."
        ),
    )
    freeze_schedule_every: Optional[int] = field(
        default=None,
        metadata=_help(
            "Schedules: units between two changes of the frozen set (>= 1). 'gradual_unfreezing' unfreezes one "
            "more group every N units (default 1); 'lisa' draws new layers every N (default 20, LMFlow's "
            "`lisa_interval_steps`); 'badam' moves to the next block every N (default 50; BAdam's "
            "`switch_block_every`, LLaMA-Factory's `badam_switch_interval`), switching when BAdam's "
            "`BlockOptimizer` does: the first block trains N - 1 steps, every later one N (with N = 3: blocks 0, 0, "
            "1, 1, 1, 2, ...)."
        ),
    )
    freeze_start: Optional[float] = field(
        default=None,
        metadata=_help(
            "'progressive': fraction of training in [0, 1) before any layer freezes (Composer's `freeze_start`; "
            "default 0.5). Composer's `LayerFreezing` changes the frozen set at the end of each epoch, from the "
            "fraction of epochs done: `freeze_schedule_unit: epoch` reproduces it (when Composer's `max_duration` "
            "is in epochs), with Composer's count arithmetic (the count is truncated)."
        ),
    )
    freeze_level: Optional[float] = field(
        default=None,
        metadata=_help(
            "'progressive': fraction of the layers (of the leaf modules, with `freeze_granularity: module`) in (0, 1] "
            "frozen by the end of training; they freeze bottom-up, linearly in time from `freeze_start` (Composer's "
            "`freeze_level`; default 1.0)."
        ),
    )
    freeze_granularity: Optional[Literal[GRANULARITIES]] = field(
        default=None,
        metadata=_help(
            "'progressive': what freezes bottom-up. 'layer' (default): whole layers, with the embeddings when the "
            "first layer freezes. 'module': Composer's `LayerFreezing` exactly: the model's leaf modules (modules "
            "with parameters and no submodules, depth first), counted without the last one, which never freezes; "
            "the count can stop inside a layer (its q_proj frozen, its k_proj training)."
        ),
    )
    freeze_unfreeze_layers: Optional[int] = field(
        default=None,
        metadata=_help(
            "'gradual_unfreezing': layers unfrozen at each step of the schedule, top-down (>= 1; default 1). A "
            "count at least the number of frozen layers unfreezes them all at once, like Lightning's "
            "`BackboneFinetuning`."
        ),
    )
    freeze_unfreeze_lr_factor: Optional[float] = field(
        default=None,
        metadata=_help(
            "'gradual_unfreezing': learning-rate factor in (0, 1] for layers when they are unfrozen (Lightning's "
            "`backbone_initial_ratio_lr`, 0.1 there). Unset: newly unfrozen layers use the scheduler's rate."
        ),
    )
    freeze_unfreeze_lr_growth: Optional[float] = field(
        default=None,
        metadata=_help(
            "'gradual_unfreezing' with `freeze_unfreeze_lr_factor`: the factor of an unfrozen layer is multiplied "
            "by this (>= 1) in every unit (epoch or step) after the one it was unfrozen in, up to 1: Lightning's "
            "`BackboneFinetuning` with its default `lambda_func` (x2.0 per epoch) and `should_align`. Default 2.0, "
            "as there: factor 0.1 gives 0.1, 0.2, 0.4, 0.8, 1, 1, ... of the scheduled rate."
        ),
    )
    freeze_stages: Optional[Union[dict, str]] = field(
        default=None,
        metadata=_help(
            "'staged': when the frozen set changes and to what: a mapping from the step (or epoch, with "
            "`freeze_schedule_unit: epoch`) each stage starts at to the bottom layers frozen from then on, a count or "
            "a fraction in [0, 1), with a stage at 0; e.g. `{0: 4, 100: 2, 300: 0}` (on the command line as JSON: "
            "'{\"0\": 4, \"100\": 2}'). The embeddings freeze with layer 0, as for 'bottom'. Counts may go up or down."
        ),
    )
    freeze_active_layers: Optional[int] = field(
        default=None,
        metadata=_help(
            "'lisa': layers trained at a time, drawn at random (LMFlow's `lisa_activated_layers`; default 2). "
            "'badam': layers per block (default 1)."
        ),
    )
    freeze_block_order: Optional[Literal[BLOCK_ORDERS]] = field(
        default=None,
        metadata=_help(
            "'badam': order in which blocks take turns (BAdam's `switch_mode`, LLaMA-Factory's "
            "`badam_switch_mode`): 'ascending' (from the input; default, as in LLaMA-Factory), 'descending' "
            "(BAdam's own default), 'random' (a new permutation each pass, from the training seed) or 'fixed' (the "
            "block `freeze_start_block` for the whole run)."
        ),
    )
    freeze_start_block: Optional[int] = field(
        default=None,
        metadata=_help(
            "'badam': index of the block that trains first, 0 being the block nearest the input (BAdam's "
            "`start_block`, LLaMA-Factory's `badam_start_block`). Default: the first block for 'ascending', the "
            "last for 'descending'. Needed by 'fixed'; refused with 'random'."
        ),
    )

    # -- adaptive selection (hf_freeze/policies/adaptive.py, hf_freeze/scores/) ----------------------------------
    freeze_score: Optional[str] = field(default=None, metadata=_help(score_help()))
    freeze_select: Optional[Literal[SELECT_ENDS]] = field(
        default=None,
        metadata=_help(
            "'adaptive': which layers freeze: those with the 'lowest' scores (default: the layers that change "
            "least, get the smallest or most settled gradients, carry the least signal) or the 'highest' (with "
            "'weight_change', 'highest' is that paper's adapted-high strategy and 'lowest' its adapted-low)."
        ),
    )
    freeze_probe_steps: Optional[float] = field(
        default=None,
        metadata=_help(
            "'adaptive' with a score measured by a probe (all but 'snr'): optimizer steps each probe lasts, with "
            "every layer measured (see `freeze_probe_mode`), before the layers are chosen: a whole number is a count of steps, a number in "
            "(0, 1) a fraction of training (default 0.05, at least one step; two for 'grad_norm_change'). Must be "
            "shorter than training and than `freeze_reselect_every`."
        ),
    )
    freeze_reselect_every: Optional[int] = field(
        default=None,
        metadata=_help(
            "'adaptive': start a new round every N optimizer steps: every layer is measured again by a new probe, "
            "then the layers are chosen again from the new scores. Unset: the layers are chosen once."
        ),
    )
    freeze_frozen_dtype: Optional[Literal[FROZEN_DTYPES]] = field(
        default=None,
        metadata=_help(
            "'bfloat16' or 'float16': store the weights of frozen linear layers in this dtype under bf16/fp16 mixed "
            "precision: autocast casts "
            "them to it on every forward anyway, so the products are the same and each frozen weight takes 2 bytes "
            "instead of 4. Norms, embeddings and biases stay as they are. A layer a schedule unfreezes gets its "
            "float32 weights back exactly; checkpoints are saved in the model's own dtype; outside autocast the "
            "layer computes in the model's dtype. Unset or 'none': frozen weights keep their dtype."
        ),
    )
    freeze_probe_mode: Optional[ProbeMode] = field(
        default=None,
        metadata=_help(
            "'adaptive' with a score measured by a probe (all but 'snr'): what the probe's optimizer steps do. "
            "'measure' (default): every layer's gradients are measured, then the step is withheld: nothing trains "
            "during the probe, the optimizer holds no state (the state of what trained before a re-selection "
            "probe is released) and what is not a layer (embeddings, head) has no gradient, so a probe needs "
            "weights, the layers' gradients and activations, not full fine-tuning's memory; 'weight_change' scores "
            "the update the optimizer would have made, computed on the meter's sample of entries. 'train': every layer trains through the probe with the optimizer (the peak memory "
            "of full fine-tuning; how probes ran before this option)."
        ),
    )

    # -- learning rates per part and per layer (hf_freeze/learning_rates/) --------------------------------------
    freeze_learning_rates: Optional[Union[dict, str]] = field(
        default=None,
        metadata=_help(
            "Learning rates of parts of the model, each trained in a param group of its own: a mapping from a part "
            "('vision_tower', 'audio_tower', 'multi_modal_projector' or 'projector', 'language_model'; or the part "
            "names of the block table: 'vision', 'audio', 'language') or a parameter-name pattern (a regular "
            "expression matched from the start of the name, as 'pattern' reads them) to its rate, e.g. "
            "`{vision_tower: 2.0e-6, multi_modal_projector: 1.0e-4, language_model: 1.0e-5}` (on the command line as "
            "JSON). A pattern wins over a part; parameters named by no key train at `learning_rate`. Every scheduler "
            "of the Trainer scales each group from its own rate. A part the model does not have is refused."
        ),
    )
    freeze_layer_lr_decay: Optional[float] = field(
        default=None,
        metadata=_help(
            "Layer-wise learning-rate decay in (0, 1] over the counted layers (`freeze_layer_stack`): layer i of L "
            "trains at the rate times decay^(L-1-i), the embeddings at decay^L, the final norm and the head at the "
            "rate itself. Multiplies a `freeze_learning_rates` rate. A layer a schedule unfreezes starts at its "
            "decayed rate times the scheduler's current multiplier."
        ),
    )

    # -- freeze + LoRA in one policy (hf_freeze/lora/) ----------------------------------------------------------
    freeze_lora: Optional[Union[dict, str]] = field(
        default=None,
        metadata=_help(
            "Static strategies: peft LoRA adapters on the linear modules of the layers the strategy froze, while the "
            "other blocks train fully, e.g. `{r: 16, alpha: 32, on: frozen}` (on the command line as JSON). Keys: "
            "'r' (rank, default 8), 'alpha' (scale alpha / r, default 2 r), 'dropout' (default 0), 'on' ('frozen', "
            "or a list of module-name patterns among the frozen blocks' linear modules). Saved as one peft adapter "
            "with the trained blocks as `modules_to_save` (`<output_dir>/lora_adapter`, and in each checkpoint), "
            "which `PeftModel.from_pretrained(base_model, folder)` reloads. Refused on a model that already "
            "carries a PEFT adapter."
        ),
    )

    def __post_init__(self) -> None:
        self._normalise_and_check()
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()

    def _normalise_and_check(self) -> None:
        check_freeze_arguments(self, FreezeArguments)

    def freeze_options(self) -> Dict[str, Any]:
        """The `freeze_*` fields as a JSON-safe dict (constructor arguments of an equivalent policy)."""
        return {name: getattr(self, name) for name in freeze_fields()}

    def is_active(self) -> bool:
        """Whether any `freeze_*` option is set (a policy other than the default 'none' with nothing set)."""
        return self.freeze_strategy != "none" or any(
            getattr(self, name) is not None for name in freeze_fields() if name != "freeze_strategy"
        )


def freeze_fields() -> List[str]:
    """Names of every `freeze_*` field, in declaration order."""
    return [item.name for item in fields(FreezeArguments)]

