"""This package's own model type: every mixer x residual combination exports, loads with
AutoModelForCausalLM.from_pretrained after `import attnres_train`, and generate() equals the decoder's forward;
legacy checkpoints (gate bias on) still load; the native target refuses what it cannot hold; lm-eval runs."""

from __future__ import annotations

import json

import pytest
import torch

import attnres_train  # noqa: F401  (registers the Auto classes)
from attnres_train.interop.kimi_linear import InteropError
from attnres_train.interop.pretrained import ModelSource, read_model_source, write_hf_directory
from attnres_train.model import ModelConfig, build_model

BASE = dict(vocab_size=258, hidden_size=32, num_layers=2, layer_pattern="LF", linear_num_heads=2, linear_head_dim=16,
            linear_chunk_size=8, mla_num_heads=2, mla_kv_lora_rank=16, mla_qk_nope_head_dim=16, mla_v_head_dim=16,
            gqa_num_heads=2, gqa_num_kv_heads=1, gqa_head_dim=16, mlp="moe", num_experts=4, top_k=2,
            expert_ffn_dim=16, ffn_dim=32, attnres_block_size=2)
COMBOS = [(linear, full, residual) for linear, full in (("kda", "mla"), ("gdn", "gqa"))
          for residual in ("standard", "full_attnres", "block_attnres")]


def _source(**fields) -> ModelSource:
    torch.manual_seed(0)
    cfg = ModelConfig.from_mapping({**BASE, **fields})
    model = build_model(cfg)
    with torch.no_grad():  # nonzero AttnRes queries and biases so every weight matters
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name and "dt_bias" not in name:
                param.add_(0.1 * torch.randn_like(param))
    return ModelSource(cfg, dict(model.state_dict()), "byte", "pt")


@pytest.mark.parametrize("linear,full,residual", COMBOS)
def test_own_export_loads_and_generates_like_the_decoder(linear, full, residual, tmp_path):
    """generate() decodes with the DecodeCache (left-padded batch): greedy tokens are the decoder's full-forward
    argmax; greedy, sampled and beam-search output equal generate(use_cache=False)."""
    from transformers import AutoModelForCausalLM

    from attnres_train.model.cache import DecodeCache, RecurrentCache

    source = _source(linear_mixer=linear, full_mixer=full, residual=residual,
                     router_score="softmax" if full == "gqa" else "sigmoid")
    assert write_hf_directory(source, tmp_path / "out", fmt="attnres") == "attnres"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == "AttnResForCausalLM"
    decoder = build_model(source.model_cfg)
    decoder.load_state_dict(source.state)
    decoder.eval()
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # the second prompt is left-padded: 5 real tokens
    common = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=257)
    result = model.generate(prompts, do_sample=False, return_dict_in_generate=True, **common)
    out, cache = result.sequences, result.cache
    assert isinstance(cache, DecodeCache) and cache.columns == 9 + 4 - 1  # the last token is never fed back
    fresh = model.model.new_cache(2, 1)
    for layer, kept, new in zip(cache.layers, cache.state_numel(), fresh.state_numel()):
        if isinstance(layer, RecurrentCache):
            assert kept == new  # a linear layer's state does not grow with the context
    with torch.no_grad():
        for row, start in ((0, 0), (1, 4)):
            sequence = out[row:row + 1, start:]
            new_tokens = sequence[0, 9 - start:].tolist()
            if 256 in new_tokens:  # generation stops at EOS; the rest is padding
                new_tokens = new_tokens[:new_tokens.index(256) + 1]
            expected = decoder(sequence).logits[0, 8 - start:-1].argmax(-1)[:len(new_tokens)]
            assert expected.tolist() == new_tokens, (row, sequence)
        torch.testing.assert_close(model(prompts[:1]).logits, decoder(prompts[:1]).logits, atol=0, rtol=0)
    assert torch.equal(model.generate(prompts, do_sample=False, use_cache=False, **common), out)
    for kind in ({"do_sample": True, "top_p": 0.9, "num_return_sequences": 2}, {"num_beams": 3, "do_sample": False}):
        outputs = []
        for use_cache in (True, False):
            torch.manual_seed(3)
            outputs.append(model.generate(prompts, use_cache=use_cache, **kind, **common))
        assert torch.equal(*outputs), kind
    back = read_model_source(tmp_path / "out")
    assert all(torch.equal(back.state[name], value) for name, value in source.state.items())


def test_cached_forward_takes_the_whole_mask_or_the_new_columns(tmp_path):
    """What transformers passes (the mask of the whole sequence) and what a caller of forward may pass (the new
    columns only) give the same logits as one full forward; a mask of neither width is refused."""
    from attnres_train.interop.hf_config import AttnResConfig
    from attnres_train.interop.hf_model import AttnResForCausalLM

    source = _source(residual="block_attnres")
    model = AttnResForCausalLM(AttnResConfig(attnres=source.model_cfg.to_dict())).eval()
    model.model.load_state_dict(source.state)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for whole in (True, False):
            prefill = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
            cache, logits = prefill.cache, [prefill.logits]
            for column in (5, 6):
                step_mask = mask[:, :column + 1] if whole else mask[:, column:column + 1]
                logits.append(model(ids[:, column:column + 1], attention_mask=step_mask, cache=cache).logits)
            torch.testing.assert_close(torch.cat(logits, 1)[1], full[1], atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.cat(logits, 1)[0, 3:], full[0, 3:], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="attention_mask has 3 columns; with a cache holding 7 columns"):
            model(ids[:, :1], attention_mask=mask[:, :3], cache=cache)


def test_native_target_refuses_a_nonzero_gate_bias_and_attnres(tmp_path):
    source = _source(residual="standard", linear_output_gate_bias=True, mla_latent_norm_eps=1e-6)
    with pytest.raises(InteropError, match="linear_output_gate_bias=true with a nonzero bias"):
        write_hf_directory(source, tmp_path / "native", fmt="kimi_linear")
    with pytest.raises(InteropError, match="residual='block_attnres'"):
        write_hf_directory(_source(residual="block_attnres"), tmp_path / "native", fmt="kimi_linear")
    assert not (tmp_path / "native").exists()


def test_checkpoint_saved_before_the_gate_bias_field_still_loads(tmp_path):
    """Older checkpoints recorded no linear_output_gate_bias and trained fla's layout (with the bias)."""
    from attnres_train.train.checkpoint import MARKER_NAME, MODEL_CONFIG_KEY

    source = _source(residual="standard", linear_output_gate_bias=True)
    legacy_cfg = {k: v for k, v in source.model_cfg.to_dict().items() if k != "linear_output_gate_bias"}
    tag_dir = tmp_path / "checkpoints" / "step_00000001"
    tag_dir.mkdir(parents=True)
    torch.save({"module": source.state}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / MARKER_NAME).write_text(json.dumps({MODEL_CONFIG_KEY: legacy_cfg}))
    loaded = read_model_source(tag_dir)
    assert loaded.model_cfg.linear_output_gate_bias
    assert torch.equal(loaded.state["layers.0.mixer.g_proj.1.bias"], source.state["layers.0.mixer.g_proj.1.bias"])


def test_bad_directories_get_one_clear_error(tmp_path):
    write_hf_directory(_source(), tmp_path / "good", fmt="attnres")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InteropError, match="model_type='llama'"):
        read_model_source(tmp_path / "llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "good" / "model.safetensors")
    weights["model.layers.0.mixer.q_proj.weight"] = weights["model.layers.0.mixer.q_proj.weight"][:5]
    save_file(weights, tmp_path / "good" / "model.safetensors")
    with pytest.raises(InteropError, match=r"tensor layers.0.mixer.q_proj.weight has shape \(5, 32\)"):
        read_model_source(tmp_path / "good")


TASKS = {
    "tiny_choice": "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
                   "metric_list:\n  - metric: acc\n",
    "tiny_generate": "output_type: generate_until\ndoc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n"
                     "  until: ['\\n']\n  max_gen_toks: 3\nmetric_list:\n  - metric: exact_match\n",
}


def test_lm_eval_runs_loglikelihood_and_generate_until_on_an_export(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from attnres_train.evaluation.lm_eval_model import AttnResLM

    write_hf_directory(_source(), tmp_path / "model")
    data = tmp_path / "tasks" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": 0})
                              for q, c in (("abc", ["def", "xyz"]), ("hello", [" world", "qq"]))) + "\n")
    for name, body in TASKS.items():
        (tmp_path / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\n{body}")
    lm = AttnResLM(pretrained=str(tmp_path / "model"), max_length=64)
    results = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    assert set(results["results"]) == set(TASKS)
    assert results["results"]["tiny_choice"]["acc,none"] in (0.0, 0.5, 1.0)
    assert "exact_match,none" in results["results"]["tiny_generate"]
    (context, continuation), = [("abc", "def")]
    logprob, _ = lm._score(lm._encode(context), lm._encode(continuation))
    with torch.no_grad():
        logits = lm.model(torch.tensor([list(b"abcde")])).logits.log_softmax(-1)[0]
    assert logprob == pytest.approx(float(logits[2, ord("d")] + logits[3, ord("e")] + logits[4, ord("f")]), abs=1e-5)

    # generate_until decodes with the cache, batched: the text of full-forward greedy decoding, cut at the stop.
    from lm_eval.api.instance import Instance

    def full_forward_text(context: str, steps: int) -> str:
        ids = list(context.encode())
        with torch.no_grad():
            for _ in range(steps):
                next_id = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
                if next_id == 256:
                    break
                ids.append(next_id)
        return bytes(ids[len(context.encode()):]).decode(errors="replace")

    contexts = ["abc", "hello there", "q"]
    expected = [full_forward_text(c, 6) for c in contexts]
    stop = next((ch for text in expected for ch in text[1:3] if ch != "\ufffd"), None)
    assert stop is not None  # some continuation has a character to stop at
    requests = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": 6}), i)
                for i, c in enumerate(contexts)]
    lm.batch_size = 2
    assert lm.generate_until(requests) == [text.split(stop)[0] for text in expected]
