"""`peftsmooth combine` on tiny runs: exact rescaling, LoRA arithmetic against hand-computed weights,
our own modules, the ensemble, and every refusal (one line, nothing written)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose
from omegaconf import OmegaConf
from safetensors.torch import load_file

from peftsmooth import cli
from peftsmooth.adapt.peft_tuners import merge_exact
from peftsmooth.certify import results
from peftsmooth.commands.certify import check_certify, run_certify
from peftsmooth.commands.combine import run_combine
from peftsmooth.commands.train import run_train
from peftsmooth.errors import UserError
from peftsmooth.library import combine
from peftsmooth.report.render import build_report
from peftsmooth.runs import load_run, read_run_info
from peftsmooth.train import watch as train_watch

QUICK = ["train.epochs=1", "train.batch_size=16", "train.max_steps_per_epoch=2", "train.max_eval=16",
         "train.eval_batch_size=64", "train.num_workers=0", "train.warmup_epochs=0", "train.lr=0.05"]
CERTIFY = ["device=cpu", "certify.n0=8", "certify.n=48", "certify.alpha=0.01", "certify.batch_size=64",
           "certify.skip=40", "certify.max=4"]
HEAD = "base_model.model.backbone.head.weight"


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    """curve.png is drawn by the code certify uses (tested there); an empty file keeps these tests fast."""
    monkeypatch.setattr(results, "plot_curve", lambda rows, path, **_: Path(path).write_bytes(b""))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A clean base (peft=full sigma=0), two LoRA runs from it (sigma 0.25 / 0.5), two prompt runs."""
    root = tmp_path_factory.mktemp("runs")
    train = lambda name, *o: run_train(compose("train", TINY + QUICK + list(o), run_dir=root / name))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:  # training.png is tested with train; not drawn here
        patch.setattr(train_watch, "plot_training", lambda history, path: None)
        train("base", "peft=full", "sigma=0")
        for sigma in (0.25, 0.5):
            train(f"lora{sigma}", "peft=lora", f"sigma={sigma}", f"base={root / 'base'}")
            train(f"prompt{sigma}", "peft=prompt", "peft.tokens=2", f"sigma={sigma}", f"base={root / 'base'}")
    return root


def combined(out: Path, runs: list, weights=None, combination="linear", *extra) -> Path:
    """`peftsmooth combine` through its Hydra config and run_combine; the new run's directory."""
    args = [f"runs=[{','.join(str(r) for r in runs)}]", f"combination={combination}", f"out={out}", *extra]
    if weights is not None:
        args.append(f"weights=[{','.join(str(w) for w in weights)}]")
    run_combine(compose("combine", args, run_dir=out.parent / f".job_{out.name}"))
    return out


def certified_rows(run: Path, out: Path, sigma=0.25) -> list[list[str]]:
    run_certify(compose("certify", [f"run={run}", f"sigma={sigma}", *CERTIFY], run_dir=out))
    return [line.split("\t")[:5] for line in (out / results.TSV_FILE).read_text().splitlines()]


def lora_parts(run: Path) -> dict:
    """module -> (B, A, scaling) of a saved LoRA adapter."""
    config = json.loads((run / "adapter_config.json").read_text())
    state = load_file(str(run / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    return {k[: -len(".lora_A.weight")]: (state[k.replace("lora_A", "lora_B")], v, scaling)
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def merged_weights(run: Path) -> dict:
    """The Linear weights certify runs on (LoRA folded in), by module name."""
    model, _ = merge_exact(load_run(run)[0])
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def base_of(runs: Path) -> dict:
    return {n: m.weight.detach() for n, m in load_run(runs / "base")[0].named_modules() if isinstance(m, torch.nn.Linear)}


def module_name(key: str) -> str:
    return key.removeprefix("base_model.model.")


# --------------------------------------------------------------------------- rescaling


def test_rescale_zero_is_the_base_and_one_is_the_run_row_for_row(runs, tmp_path):
    zero = combined(tmp_path / "zero", [runs / "lora0.25"], [0])
    one = combined(tmp_path / "one", [runs / "lora0.25"], [1])
    assert load_file(str(one / "adapter_model.safetensors")).keys() == load_file(
        str(runs / "lora0.25" / "adapter_model.safetensors")).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(one / "adapter_model.safetensors")).values(),
                                                 load_file(str(runs / "lora0.25" / "adapter_model.safetensors")).values()))
    base_rows = certified_rows(runs / "base", tmp_path / "c_base")
    run_rows = certified_rows(runs / "lora0.25", tmp_path / "c_run")
    assert certified_rows(zero, tmp_path / "c_zero") == base_rows
    assert certified_rows(one, tmp_path / "c_one") == run_rows
    assert results.read_summary(tmp_path / "c_zero")["merged_adapters"] == ["LORA"]  # certified like any LoRA run
    info = read_run_info(zero)
    assert info.method == "lora[0*s0.25]" and info.sigma == 0.25 and info.command == "combine"
    assert info["combine"] == {"combination": "linear", "sources": [str(runs / "lora0.25")], "weights": [0.0], "rank": 8}


def test_strength_scales_the_update_and_the_head_change(runs, tmp_path):
    base = base_of(runs)
    head0 = base["backbone.head"]
    head = load_file(str(runs / "lora0.25" / "adapter_model.safetensors"))[HEAD]
    for weight in (0.5, -1.0):
        merged = merged_weights(combined(tmp_path / f"w{weight}", [runs / "lora0.25"], [weight]))
        for name, (b, a, scaling) in lora_parts(runs / "lora0.25").items():
            name = module_name(name)
            torch.testing.assert_close(merged[name], base[name] + weight * scaling * (b @ a))
        torch.testing.assert_close(merged["backbone.head"], (1 - weight) * head0 + weight * head)


# --------------------------------------------------------------------------- several LoRA runs


def test_linear_and_cat_of_two_lora_runs_equal_the_hand_computed_weights(runs, tmp_path):
    weights, sources = [0.7, -0.3], [runs / "lora0.25", runs / "lora0.5"]
    parts = [lora_parts(s) for s in sources]
    heads = [load_file(str(s / "adapter_model.safetensors"))[HEAD] for s in sources]
    base = base_of(runs)
    linear = merged_weights(combined(tmp_path / "linear", sources, weights))
    cat = merged_weights(combined(tmp_path / "cat", sources, weights, "cat"))
    svd = merged_weights(combined(tmp_path / "svd", sources, weights, "svd", "svd_rank=16"))
    for key in parts[0]:
        (b1, a1, s1), (b2, a2, s2) = parts[0][key], parts[1][key]
        root = [w * s for w, s in zip(weights, (s1, s2))]  # peft's linear: sqrt(|w s|) on B and A, sign on A
        b = abs(root[0]) ** 0.5 * b1 + abs(root[1]) ** 0.5 * b2
        a = (abs(root[0]) ** 0.5 * a1 * (1 if root[0] >= 0 else -1) + abs(root[1]) ** 0.5 * a2 * (1 if root[1] >= 0 else -1))
        name = module_name(key)
        torch.testing.assert_close(linear[name], base[name] + b @ a)
        exact = base[name] + root[0] * (b1 @ a1) + root[1] * (b2 @ a2)
        torch.testing.assert_close(cat[name], exact)  # cat: exactly sum_i w_i s_i B_i A_i
        torch.testing.assert_close(svd[name], exact, atol=1e-5, rtol=1e-4)  # full rank 16: the same sum
    head = 0.7 * heads[0] - 0.3 * heads[1] + 0.6 * base["backbone.head"]
    for merged in (linear, cat, svd):
        torch.testing.assert_close(merged["backbone.head"], head)
    info = read_run_info(tmp_path / "cat")
    assert info.method == "lora[cat 0.7*s0.25-0.3*s0.5]" and info.sigma is None
    assert info["combine"]["rank"] == 16 and info.trainable_params > read_run_info(sources[0]).trainable_params


def test_prompt_runs_combine_their_parameters_linearly(runs, tmp_path):
    sources = [runs / "prompt0.25", runs / "prompt0.5"]
    out = combined(tmp_path / "prompt", sources, [0.5, 0.5])
    states = [load_file(str(s / "prompt.safetensors")) for s in sources]
    mixed = load_file(str(out / "prompt.safetensors"))
    assert set(mixed) == {"backbone.prompt.tokens", "backbone.head.weight", "backbone.head.bias"}
    for key, value in mixed.items():  # weights summing to 1: the base's head has no share
        torch.testing.assert_close(value, 0.5 * states[0][key] + 0.5 * states[1][key])
    model, info = load_run(out)
    assert info.method == "prompt[linear 0.5*s0.25+0.5*s0.5]" and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


# --------------------------------------------------------------------------- the ensemble


def test_ensemble_is_the_mean_of_the_members_softmax_and_certifies(runs, tmp_path, monkeypatch, hydra_logging):
    monkeypatch.chdir(tmp_path)
    cli.main(["combine", str(runs / "lora0.25"), str(runs / "lora0.5"), "combination=ensemble"])  # positional runs
    out = tmp_path / "outputs" / "combine" / "ensemble_0.5xlora0.25+0.5xlora0.5"
    assert sorted(p.name for p in (tmp_path / "outputs" / "combine").iterdir()) == [out.name]  # no Hydra dir left
    ensemble, info = load_run(out)
    assert info.sigma is None and info.method == "lora[ensemble s0.25+s0.5]"
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        members = [torch.softmax(load_run(r)[0](x), dim=-1) for r in (runs / "lora0.25", runs / "lora0.5")]
        torch.testing.assert_close(ensemble(x).exp(), (members[0] + members[1]) / 2)
        assert merge_exact(ensemble)[1] == []  # never folded: that would drop a member
    with pytest.raises(UserError, match="sigma=null"):
        check_certify(compose("certify", [f"run={out}", *CERTIFY]))
    certified_rows(out, tmp_path / "cert", sigma=0.5)
    row = next(r for r in build_report([tmp_path], [0.25, 0.5]).rows if r["certification"])
    assert (row["method"], row["sigma"], row["num_images"]) == ("lora[ensemble s0.25+s0.5]", 0.5, 4)


# --------------------------------------------------------------------------- refusals


def edited(source: Path, dest: Path, run_json: dict | None = None, adapter: dict | None = None) -> Path:
    """A copy of a run with some run.json / adapter_config.json keys changed (dotted keys reach in)."""
    shutil.copytree(source, dest)
    for name, changes in (("run.json", run_json), ("adapter_config.json", adapter)):
        if changes:
            data = json.loads((dest / name).read_text())
            for key, value in changes.items():
                *path, last = key.split(".")
                node = data
                for part in path:
                    node = node[part]
                node[last] = value
            (dest / name).write_text(json.dumps(data))
    return dest


LOHA = {"_target_": "peftsmooth.adapt.peft_tuners.PeftTuner", "name": "loha", "config_class": "peft.LoHaConfig", "r": 8}
# (runs as names under the fixture / edited copies, other keys, a piece of the one-line error)
REFUSED = [
    ([], {}, "runs=[]"),
    (["nowhere"], {}, ": no such directory"),
    (["lora0.25", "lora0.5"], {"combination": "average"}, "combination=average is not allowed"),
    (["lora0.25", "lora0.5"], {"weights": [1.0]}, "has 1 values for 2 runs"),
    (["lora0.25", "lora0.5"], {"weights": ["a", 1]}, "is not a finite number"),
    (["lora0.25"], {"combination": "svd"}, "one run is rescaled"),
    (["lora0.25", "lora0.5"], {"combination": "ensemble", "weights": [1, -1]}, "must be > 0"),
    (["lora0.25", "lora0.5"], {"combination": "ties"}, "combination=ties needs density="),
    (["lora0.25", "lora0.5"], {"combination": "dare_ties", "density": 1.5}, "density=1.5 must be a number in (0, 1]"),
    (["lora0.25", "lora0.5"], {"density": 0.5}, "density=0.5 is for"),
    (["lora0.25", "lora0.5"], {"svd_rank": 4}, "svd_rank=4 is for combination=svd"),
    (["lora0.25", "lora0.5"], {"combination": "svd", "svd_rank": 0}, "svd_rank=0 must be a positive"),
    (["lora0.25", "prompt0.5"], {}, "differ in method family"),
    (["lora0.25", "rank4"], {}, "needs adapters of one rank"),
    (["lora0.25", "rank4"], {"combination": "dare_linear", "density": 0.5}, "needs adapters of one rank"),
    (["lora0.25", "dora"], {}, "use_dora=true"),
    (["lora0.25", "deeper"], {}, "differ in model.kwargs.depth"),
    (["lora0.25", "other_weights"], {}, "different base weights"),
    (["lora0.25", "cifar"], {}, "differ in dataset"),
    (["lora0.25", "unfinished"], {}, "is not finished"),
    (["fronted"], {}, "has a front stage"),
    (["plain"], {}, "has no adapter that combine can mix"),
    (["loha", "loha"], {}, "combine with combination=ensemble"),
    (["prompt0.25", "prompt0.5"], {"combination": "svd"}, "mix their parameters linearly"),
    (["prompt0.25", "prompt0.5"], {"combination": "ensemble"}, "holds peft adapters"),
    (["lora0.25", "lora0.5"], {"out": "taken"}, "already exists"),
]


@pytest.fixture(scope="module")
def refusable(runs):
    """The fixture's runs plus edited copies that differ in one thing each."""
    lora = runs / "lora0.25"
    other = runs / "other_base.safetensors"
    state = load_file(str(runs / "base" / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in state.items()}, str(other))
    edited(lora, runs / "rank4", adapter={"r": 4})
    edited(lora, runs / "dora", adapter={"use_dora": True})
    edited(lora, runs / "deeper", run_json={"model.kwargs.depth": 3})
    edited(lora, runs / "other_weights", run_json={"model.checkpoint": str(other)})
    edited(lora, runs / "cifar", run_json={"dataset.name": "cifar10"})
    edited(lora, runs / "unfinished", run_json={"finished": False})
    edited(lora, runs / "fronted", run_json={"front": {"_target_": "peftsmooth.front.denoisers.DnCNN"}})
    edited(runs / "base", runs / "plain", run_json={"adapt": None})
    edited(lora, runs / "loha", run_json={"adapt": LOHA, "method": "loha"})
    (runs / "taken").mkdir()
    (runs / "taken" / "x").write_text("")
    return runs


@pytest.mark.parametrize("names, keys, needle", REFUSED, ids=[n for _, _, n in REFUSED])
def test_refused_before_anything_is_written(refusable, names, keys, needle, tmp_path):
    cfg = {"runs": [str(refusable / n) for n in names], "weights": None, "combination": "linear", "svd_rank": None,
           "density": None, "majority_sign_method": "total", "seed": 0, "out": str(tmp_path / "out"), **keys}
    if keys.get("out"):
        cfg["out"] = str(refusable / keys["out"])
    with pytest.raises(UserError, match=re.escape(needle)):
        combine.plan(OmegaConf.create(cfg))
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_line_exit_2_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(["combine", f"runs=[{runs / 'lora0.25'},{runs / 'lora0.5'}]", "weights=[1,2,3]"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("peftsmooth combine: error: weights=[1, 2, 3] has 3 values for 2 runs")
    assert list(tmp_path.iterdir()) == []


def test_cat_accepts_different_ranks(refusable, tmp_path):
    cfg = OmegaConf.create({"runs": [str(refusable / "lora0.25"), str(refusable / "rank4")], "combination": "cat",
                            "out": str(tmp_path / "o")})
    assert combine.plan(cfg).combination == "cat"
