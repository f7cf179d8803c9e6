"""fastload.pipeline("text-generation", ...): transformers' TextGenerationPipeline over fastload's model and
tokenizer (transformers 5: pipelines/__init__.py pipeline() and pipelines/text_generation.py), without torch.

Same inputs (a string, a list of strings, a chat as role/content dicts, a list of chats, a generator of
those), same outputs ([{"generated_text": ...}] per input, a list of those for a list), same defaults:
max_new_tokens=256, do_sample=True, temperature=0.7 for what neither the call nor the model's generation
config sets (the sampling ones only when sampling); the tokenizer's pad token as pad_token_id; text
prompts tokenized with the tokenizer's own add_special_tokens default (chats never add any); a right-
padding tokenizer switched to left padding; batch_size > 1 left-pads the prompts into one generate call.

Where fastload differs (said in the errors too): only "text-generation" (other tasks raise
NotImplementedError); stop_sequence stops at the whole string (generate's stop_strings; transformers at its first
token); assistant models and pipeline_class are not supported; num_workers
is accepted and ignored (no DataLoader: batches are formed in this process); with no model, the model is
FASTLOAD_MODEL or the demo model (transformers downloads openai-community/gpt2); a loaded model given with
tokenizer=None gets the tokenizer of the path it was loaded from."""
from __future__ import annotations

import copy
import enum
import os
import types

import numpy as np

from . import modeling
from .tokenizer import AutoTokenizer

SUPPORTED_TASKS = ("text-generation",)

# pipeline() arguments of transformers that mean nothing here (text only, no downloads of code or processors)
_IGNORED_FACTORY_ARGS = ("use_fast", "token", "trust_remote_code", "code_revision", "num_workers", "framework",
                         "use_auth_token", "_commit_hash", "binary_output")


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


class Chat:
    """A conversation (list of role/content dicts) as one pipeline input (transformers' Chat)."""

    def __init__(self, messages):
        for m in messages:
            if not _is_message(m):
                raise ValueError("When passing chat dicts as input, each dict must have a 'role' and 'content' key.")
        self.messages = messages


def _is_message(m):
    return isinstance(m, dict) and "role" in m and "content" in m


def _diff_dict(gc) -> dict:
    """The fields a generation config sets, which the pipeline counts as "set" when it decides which of its own
    defaults to add: fastload's GenerationConfig its explicitly set fields (default-valued ones included: a
    generation_config.json saying "do_sample": false is a setting), a dict every key, transformers' config its
    to_diff_dict() fields that are not None (transformers 5: every field of GenerationConfig() is None, so a
    do_sample=False or max_length=20 it holds is set). Metadata dropped. (Filtering by fastload's default values,
    as transformers 4 did, made a model whose config says do_sample=false sample at 0.7.)"""
    return {k: v for k, v in modeling._explicit(gc).items() if v is not None}  # None: unset, as transformers 5


_SAMPLING_PARAMS = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
_PIPELINE_PARAMS = {"return_full_text", "return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces",
                    "prefix", "handle_long_generation", "stop_sequence", "truncation", "max_length",
                    "continue_final_message", "skip_special_tokens", "tokenizer_encode_kwargs", "tools", "documents",
                    "add_special_tokens", "padding"}


class TextGenerationPipeline:
    """transformers' TextGenerationPipeline: call it with a prompt, a chat, or lists of them."""

    _default_generation_config = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}

    def __init__(self, model, tokenizer=None, task="text-generation", device=None, batch_size=None, num_workers=None,
                 **kwargs):
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.device = getattr(model, "device", device)
        if self.tokenizer is not None and getattr(self.tokenizer, "padding_side", None) == "right":
            self.tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
        cfg = getattr(model, "config", None)
        self.prefix = cfg.get("prefix") if isinstance(cfg, dict) else getattr(cfg, "prefix", None)
        gen_keys = set(getattr(modeling, "GEN_KEYS", ())) | set(modeling.GenerationConfig.DEFAULTS) | {"generation_config"}
        gen_keys -= _PIPELINE_PARAMS
        self._generate_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_keys}
        self._generation_defaults = dict(self._default_generation_config)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            self._generation_defaults["pad_token_id"] = self.tokenizer.pad_token_id
        self.call_count = 0
        self._batch_size = batch_size
        self._num_workers = num_workers
        unknown = sorted(k for k in kwargs if k not in _PIPELINE_PARAMS)
        if unknown:
            raise TypeError(f"pipeline: unsupported argument(s) {unknown}; generation arguments: "
                            f"{sorted(gen_keys)}; pipeline arguments: {sorted(_PIPELINE_PARAMS)}")
        self._preprocess_params, self._forward_params, self._postprocess_params = self._sanitize_parameters(**kwargs)
        if self.prefix:
            pre, fwd, _ = self._sanitize_parameters(prefix=self.prefix, **self._forward_params)
            self._preprocess_params = {**self._preprocess_params, **pre}
            self._forward_params = {**self._forward_params, **fwd}

    def __repr__(self):
        return f"TextGenerationPipeline(model={self.model!r}, device={self.device})"

    # ------------------------------------------------------------------ parameters
    def _sanitize_parameters(self, return_full_text=None, return_tensors=None, return_text=None, return_type=None,
                             clean_up_tokenization_spaces=None, prefix=None, handle_long_generation=None,
                             stop_sequence=None, truncation=None, max_length=None, continue_final_message=None,
                             skip_special_tokens=None, tokenizer_encode_kwargs=None, tools=None, documents=None,
                             **generate_kwargs):
        preprocess_params = {}
        add_special_tokens = False
        if "add_special_tokens" in generate_kwargs:
            add_special_tokens = preprocess_params["add_special_tokens"] = generate_kwargs.pop("add_special_tokens")
        if "padding" in generate_kwargs:
            preprocess_params["padding"] = generate_kwargs.pop("padding")
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if max_length is not None:
            preprocess_params["max_length"] = max_length
            generate_kwargs["max_length"] = max_length
        if tools is not None:
            preprocess_params["tools"] = tools
        if documents is not None:
            preprocess_params["documents"] = documents
        if prefix is not None:
            preprocess_params["prefix"] = prefix
        if prefix:
            prefix_inputs = self.tokenizer(prefix, padding=False, add_special_tokens=add_special_tokens, return_tensors="np")
            generate_kwargs["prefix_length"] = prefix_inputs["input_ids"].shape[-1]
        if handle_long_generation is not None:
            if handle_long_generation != "hole":
                raise ValueError(f"{handle_long_generation} is not a valid value for `handle_long_generation` parameter "
                                 "expected [None, 'hole']")
            preprocess_params["handle_long_generation"] = handle_long_generation
        if continue_final_message is not None:
            preprocess_params["continue_final_message"] = continue_final_message
        if tokenizer_encode_kwargs is not None:
            preprocess_params["tokenizer_encode_kwargs"] = tokenizer_encode_kwargs
        if stop_sequence is not None:
            # transformers stops at the first token of the sequence (with a warning when it has more); here the whole
            # string, through generate's stop_strings (the text ends with it, as transformers' stop_strings)
            if not isinstance(stop_sequence, str) or not stop_sequence:
                raise ValueError(f"stop_sequence must be a non-empty string, got {stop_sequence!r}")
            stops = generate_kwargs.get("stop_strings") or []
            generate_kwargs["stop_strings"] = ([stops] if isinstance(stops, str) else list(stops)) + [stop_sequence]
            generate_kwargs.setdefault("tokenizer", self.tokenizer)
        preprocess_params.update(generate_kwargs)
        forward_params = generate_kwargs

        postprocess_params = {}
        if tools is not None:
            postprocess_params["tools"] = tools
        if return_full_text is not None and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
            if return_tensors is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
        if return_tensors is not None and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.TENSORS
        if return_type is not None:
            postprocess_params["return_type"] = ReturnType(return_type.value if isinstance(return_type, enum.Enum)
                                                           else return_type)
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if continue_final_message is not None:
            postprocess_params["continue_final_message"] = continue_final_message
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        return preprocess_params, forward_params, postprocess_params

    def _get_set_generation_params(self, generate_kwargs):
        """What a generate() call with these kwargs does not take from the global defaults: the kwargs, over
        their generation_config, over the model's generation config."""
        params = _diff_dict(getattr(self.model, "generation_config", None))
        if generate_kwargs.get("generation_config") is not None:
            params.update(_diff_dict(generate_kwargs["generation_config"]))
        return {**params, **generate_kwargs}

    def _prepare_generate_kwargs(self, generate_kwargs, **overrides):
        if "generation_config" not in generate_kwargs:
            generate_kwargs = {**self._generate_kwargs, **generate_kwargs}
        set_params = self._get_set_generation_params(generate_kwargs)
        added = {k: v for k, v in self._generation_defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING_PARAMS}
        added.update(overrides)
        user_config = generate_kwargs.get("generation_config")
        if user_config is None:
            return {**generate_kwargs, **added}
        user_config = copy.deepcopy(user_config)
        user_config.update(**added)
        return {**generate_kwargs, "generation_config": user_config}

    # ------------------------------------------------------------------ the three steps
    def preprocess(self, prompt_text, prefix="", handle_long_generation=None, add_special_tokens=None, truncation=None,
                   padding=None, max_length=None, continue_final_message=None, tokenizer_encode_kwargs=None, tools=None,
                   documents=None, **generate_kwargs):
        tk_kwargs = {k: v for k, v in (("add_special_tokens", add_special_tokens), ("truncation", truncation),
                                       ("padding", padding), ("max_length", max_length)) if v is not None}
        tk_kwargs.update(tokenizer_encode_kwargs or {})
        if isinstance(prompt_text, Chat):
            tk_kwargs.pop("add_special_tokens", None)  # chats: the template holds the special tokens
            if continue_final_message is None:
                continue_final_message = prompt_text.messages[-1]["role"] == "assistant"
            text = self.tokenizer.apply_chat_template(prompt_text.messages, tokenize=False,
                                                      add_generation_prompt=not continue_final_message,
                                                      continue_final_message=continue_final_message,
                                                      tools=tools, documents=documents)
            inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="np", **tk_kwargs)
        else:
            if not isinstance(prompt_text, str):
                raise TypeError(f"text-generation inputs are strings or chats (lists of role/content dicts), got "
                                f"{type(prompt_text).__name__}")
            inputs = self.tokenizer(prefix + prompt_text, return_tensors="np", **tk_kwargs)
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        inputs["prompt_text"] = prompt_text
        if handle_long_generation == "hole":
            cur_len = inputs["input_ids"].shape[-1]
            params = self._get_set_generation_params(self._prepare_generate_kwargs(generate_kwargs))
            new_tokens = params.get("max_new_tokens")
            if new_tokens is None:
                new_tokens = params.get("max_length", 20) - cur_len
                if new_tokens < 0:
                    raise ValueError("We cannot infer how many new tokens are expected")
            if cur_len + new_tokens > self.tokenizer.model_max_length:
                keep = self.tokenizer.model_max_length - new_tokens
                if keep <= 0:
                    raise ValueError("We cannot use `hole` to handle this generation the number of desired tokens "
                                     "exceeds the models max length")
                inputs["input_ids"] = inputs["input_ids"][:, -keep:]
                if "attention_mask" in inputs:
                    inputs["attention_mask"] = inputs["attention_mask"][:, -keep:]
        return inputs

    def _forward(self, model_inputs, **generate_kwargs):
        input_ids = model_inputs["input_ids"]
        attention_mask = model_inputs.get("attention_mask")
        prompt_text = model_inputs["prompt_text"]
        in_b = input_ids.shape[0]
        prompt_given = input_ids.shape[1] > 0
        prefix_length = generate_kwargs.pop("prefix_length", 0)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        if prefix_length:
            params = self._get_set_generation_params(generate_kwargs)
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in params and new_tokens not in params:
                    generate_kwargs[length] = params[length] + prefix_length
        if not prompt_given:  # an empty prompt starts from the bos token, as transformers' generate does
            bos = getattr(self.model, "generation_config", {}).get("bos_token_id")
            bos = self.tokenizer.bos_token_id if bos is None else bos
            if bos is None:
                raise ValueError("an empty prompt needs a bos_token_id to start from (the model and tokenizer have none)")
            input_ids, attention_mask = np.full((in_b, 1), int(bos), dtype=np.int64), None
        out = np.asarray(self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs))
        out_b = out.shape[0]
        return {"generated_sequence": out.reshape(in_b, out_b // in_b, *out.shape[1:]),
                "input_ids": model_inputs["input_ids"] if prompt_given else None, "prompt_text": prompt_text}

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, clean_up_tokenization_spaces=None,
                    continue_final_message=None, skip_special_tokens=None, tools=None):
        generated_sequence = model_outputs["generated_sequence"][0].tolist()
        input_ids = model_outputs["input_ids"]
        prompt_text = model_outputs["prompt_text"]
        skip_special_tokens = True if skip_special_tokens is None else skip_special_tokens
        records = []
        for sequence in generated_sequence:
            if return_type == ReturnType.TENSORS:
                records.append({"generated_token_ids": sequence})
                continue
            prompt_len = 0 if input_ids is None else input_ids.shape[-1]
            all_text = self.tokenizer.decode(sequence[prompt_len:], skip_special_tokens=skip_special_tokens,
                                             clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            if return_type == ReturnType.FULL_TEXT:
                if isinstance(prompt_text, str):
                    all_text = prompt_text + all_text
                elif isinstance(prompt_text, Chat):
                    cfm = continue_final_message
                    if cfm is None:
                        cfm = prompt_text.messages[-1]["role"] == "assistant"
                    if cfm:
                        last = prompt_text.messages[-1]
                        all_text = list(prompt_text.messages)[:-1] + [
                            {"role": last["role"], "content": last["content"] + all_text}]
                    else:
                        all_text = list(prompt_text.messages) + [{"role": "assistant", "content": all_text}]
            records.append({"generated_text": all_text})
        return records

    # ------------------------------------------------------------------ calling
    @staticmethod
    def _as_items(inputs):
        """(items, single): a chat becomes one Chat, a list of chats a list of Chats (transformers' rules)."""
        if isinstance(inputs, (list, tuple)):
            if inputs and _is_message(inputs[0]):
                return Chat(inputs), True
            if inputs and isinstance(inputs[0], (list, tuple)) and all(c and _is_message(c[0]) for c in inputs):
                return [Chat(c) for c in inputs], False
            return list(inputs), False
        return inputs, True

    def __call__(self, text_inputs, *args, num_workers=None, batch_size=None, **kwargs):
        if args:
            raise TypeError(f"pipeline call: unexpected positional arguments {args!r}")
        if batch_size is None:
            batch_size = self._batch_size or 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        pre = {**self._preprocess_params, **pre}
        fwd = {**self._forward_params, **fwd}
        post = {**self._postprocess_params, **post}
        self.call_count += 1
        if isinstance(text_inputs, types.GeneratorType):
            return self._iterate(text_inputs, batch_size, pre, fwd, post)
        items, single = self._as_items(text_inputs)
        if single:
            return self._run([items], 1, pre, fwd, post)[0]
        return self._run(items, batch_size, pre, fwd, post)

    def _iterate(self, gen, batch_size, pre, fwd, post):
        batch = []
        for x in gen:
            if isinstance(x, (list, tuple)) and x and _is_message(x[0]):
                x = Chat(x)
            batch.append(x)
            if len(batch) == batch_size:
                yield from self._run(batch, batch_size, pre, fwd, post)
                batch = []
        if batch:
            yield from self._run(batch, batch_size, pre, fwd, post)

    def _run(self, items, batch_size, pre, fwd, post):
        inputs = [self.preprocess(x, **pre) for x in items]
        out = []
        for i in range(0, len(inputs), batch_size):
            group = inputs[i:i + batch_size]
            if len(group) == 1:
                outputs = [self._forward(dict(group[0]), **fwd)]
            else:
                outputs = self._forward_batch(group, fwd)
            out += [self.postprocess(o, **post) for o in outputs]
        return out

    def _forward_batch(self, group, fwd):
        """Left- (or right-, as the tokenizer says) pads the prompts into one generate call, then gives each
        input its rows back (transformers' pad_collate_fn + unbatching: the prompt length is the padded one)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            raise ValueError("Pipeline with tokenizer without pad_token cannot do batching. You can try to set it with "
                             "`pipe.tokenizer.pad_token_id = model.config.eos_token_id`.")
        if any(g["input_ids"].shape[1] == 0 for g in group):
            return [self._forward(dict(g), **fwd) for g in group]
        T = max(g["input_ids"].shape[1] for g in group)
        left = getattr(self.tokenizer, "padding_side", "left") == "left"
        ids = np.full((len(group), T), pad, dtype=np.int64)
        mask = np.zeros((len(group), T), dtype=np.int64)
        for r, g in enumerate(group):
            n = g["input_ids"].shape[1]
            sl = slice(T - n, T) if left else slice(0, n)
            ids[r, sl] = g["input_ids"][0]
            mask[r, sl] = g["attention_mask"][0] if "attention_mask" in g else 1
        res = self._forward({"input_ids": ids, "attention_mask": mask, "prompt_text": None}, **dict(fwd))
        seqs = res["generated_sequence"]
        return [{"generated_sequence": seqs[r:r + 1], "input_ids": ids[r:r + 1], "prompt_text": g["prompt_text"]}
                for r, g in enumerate(group)]


def _device_arg(device):
    """transformers' pipeline device (-1 / "cpu", N / "cuda:N", a torch.device) -> fastload's device string."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise ValueError(f"device={device!r} is not a device")
    if isinstance(device, int):  # transformers: -1 is the CPU, N the Nth accelerator, or the CPU when there is none
        from . import cuda
        return f"cuda:{device}" if device >= 0 and cuda.is_available() else "cpu"
    return str(device)


def pipeline(task=None, model=None, config=None, tokenizer=None, feature_extractor=None, image_processor=None,
             processor=None, revision=None, use_fast=True, token=None, device=None, device_map=None, dtype=None,
             trust_remote_code=None, model_kwargs=None, pipeline_class=None, **kwargs) -> TextGenerationPipeline:
    """transformers' pipeline() for task="text-generation" (the only task fastload has; task=None means it).
    `model` is a directory, .gguf file, hub id in the local cache, or a loaded fastload model; `tokenizer` a
    path or tokenizer object (None: the model's). device / device_map / dtype (or torch_dtype) / model_kwargs
    go to from_pretrained for a path; a loaded model stays where it is (a different `device` is an error).
    Remaining keyword arguments are generation arguments and pipeline options applied to every call."""
    if task is None:
        task = "text-generation"
    if task not in SUPPORTED_TASKS:
        raise NotImplementedError(f"pipeline task {task!r} is not supported by fastload; supported: "
                                  f"{', '.join(repr(t) for t in SUPPORTED_TASKS)}")
    for name, v in (("feature_extractor", feature_extractor), ("image_processor", image_processor),
                    ("processor", processor), ("pipeline_class", pipeline_class), ("config", config),
                    ("assistant_model", kwargs.get("assistant_model")),
                    ("assistant_tokenizer", kwargs.get("assistant_tokenizer"))):
        if v is not None and not (name == "config" and isinstance(model, str) and v == model):
            raise NotImplementedError(f"pipeline: {name}= is not supported by fastload (text-generation with the "
                                      "model's own config and tokenizer)")
    for k in _IGNORED_FACTORY_ARGS:
        kwargs.pop(k, None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if dtype is None or (isinstance(dtype, str) and dtype == "auto" and torch_dtype is not None):
        dtype = torch_dtype
    model_kwargs = dict(model_kwargs or {})
    local_files_only = kwargs.pop("local_files_only", None)
    dev = _device_arg(device)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if model is None:
        from . import config as cfgmod
        model = cfgmod.env("FASTLOAD_MODEL")
        if model is None:
            from .demo import demo_model_path
            model = demo_model_path()
    if isinstance(model, str):
        load = dict(model_kwargs)
        if device_map is not None:
            if "device_map" in load:
                raise ValueError('You cannot use both `pipeline(... device_map=..., model_kwargs={"device_map":...})`')
            load["device_map"] = device_map
        elif dev is not None and "device_map" not in load:
            load["device_map"] = dev
        if dtype is not None:
            if "torch_dtype" in load or "dtype" in load:
                raise ValueError('You cannot use both `pipeline(... dtype=..., model_kwargs={"dtype":...})`')
            load["torch_dtype"] = dtype
        if revision is not None:
            load.setdefault("revision", revision)
        if local_files_only is not None:
            load.setdefault("local_files_only", local_files_only)
        model_obj = modeling.FastModelForCausalLM.from_pretrained(model, **load)
    else:
        model_obj = model
        if not hasattr(model_obj, "generate"):
            raise TypeError(f"pipeline: model must be a path, hub id, .gguf file or a loaded model, got "
                            f"{type(model).__name__}")
        if dev is not None and str(getattr(model_obj, "device", dev)) != _normal(dev):
            if not hasattr(model_obj, "to"):
                raise ValueError(f"pipeline: the model is on {model_obj.device}, device={device!r} asks for another; "
                                 f"load it with device_map={dev!r}")
            model_obj = model_obj.to(dev) or model_obj
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        src = tokenizer if tokenizer is not None else (model if isinstance(model, str) else
                                                       getattr(model_obj, "name_or_path", None))
        if not src:
            raise ValueError("pipeline: pass tokenizer= (the model was not loaded from a path to take it from)")
        tk = {k: v for k, v in (("revision", revision), ("local_files_only", local_files_only)) if v is not None}
        if "allow_external_symlinks" in model_kwargs:
            tk["allow_external_symlinks"] = model_kwargs["allow_external_symlinks"]
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(src), **tk)
    return TextGenerationPipeline(model=model_obj, tokenizer=tokenizer, task=task, **kwargs)


def _normal(dev):
    from . import config as cfgmod
    return cfgmod.normalize_device(dev)


__all__ = ["pipeline", "TextGenerationPipeline", "SUPPORTED_TASKS"]
