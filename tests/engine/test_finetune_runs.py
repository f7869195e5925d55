"""Finetuning runs end to end on the embedded data (one rank, in process): each protocol from a pretrained
tiny IWM (against the same protocol from a randomly initialised one where that comparison holds at this scale:
the predictor protocols; docs/finetune.md); resume; the eval commands and their errors (exit code 2, one line)."""
import json
import shutil

import pytest
import torch

from tests.helpers import eval_in_process, finetune_config, run_eval, tiny_config, write_folder

PRETRAIN_STEPS = 150


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(pretrained checkpoint, randomly initialised checkpoint of the same network)."""
    from engine import checkpoint as ckpt_lib
    from engine.models import IWM
    from engine.pretrain import pretrain

    root = tmp_path_factory.mktemp("sources")
    pretrain(tiny_config(root / "pretrained", PRETRAIN_STEPS, ["data.embedded_per_class=32"]))
    cfg = tiny_config(root / "random", 1)
    torch.manual_seed(0)
    model = IWM(cfg)
    ckpt_lib.save_weights(str(root / "random.pt"), config=cfg.to_dict(), step=0, encoder=model.encoder,
                          predictor=model.predictor, target_encoder=model.encoder)
    return str(root / "pretrained"), str(root / "random.pt")


# The protocol tests run on the embedded set at 200 images per class (2000 train, 500 val: 0.2 pp per image;
# the binomial standard error of a top-1 between 10 and 50% is 1.3-2.2 pp).
COMPARED = ["data.embedded_per_class=200"]
PROTOCOL_STEPS = {"predictor": 300, "encoder": 300, "linear": 300, "attentive": 300}


def protocol_top1(source, out, protocol):
    from engine.finetune import finetune

    cfg = finetune_config(source, out, protocol, steps=PROTOCOL_STEPS[protocol], extra=COMPARED)
    return finetune(cfg).metrics["best_top1"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["predictor"])
def test_protocol_beats_a_random_encoder(sources, tmp_path, protocol):
    """The pretrained encoder + predictor against the same protocol from a randomly initialised encoder +
    predictor, by at least 5 pp. Measured with the fixture's pretraining at seeds 0 / 1 / 2 (the random network
    drawn with the same seed; docs/results.md), top-1 %: predictor (300 steps) 21.4 / 20.0 / 21.4 against
    10.0 / 10.0 / 10.0. Not end_to_end: at 600 steps 52.0 / 28.0 / 14.8 against 25.8 / 19.2 / 14.4, a tie at seed
    2 (end-to-end finetuning of these tiny networks often stays near the loss plateau), and its two runs were the
    suite's costliest test (712 s of a 61-minute `make test`); what end_to_end adds to the predictor protocol (the
    encoder trained, with layer decay) is tested in tests/engine/test_finetune.py and its recipe's smoke run."""
    pretrained, random_init = sources
    top1 = {name: protocol_top1(src, tmp_path / name, protocol)
            for name, src in (("pretrained", pretrained), ("random", random_init))}
    print(protocol, top1)
    assert top1["pretrained"] >= top1["random"] + 5.0, top1


# The other protocols read the encoder itself, and there a randomly initialised encoder is as good or better at every
# CPU scale measured (docs/results.md: 150 to 3000 pretraining steps, 32 and 64 px, widths 48 and
# 128, I-JEPA and sequence conditioning, more pretraining makes it worse). Measured here (300 steps, pretraining
# seeds 0 / 1 / 2, top-1 %, pretrained vs random): encoder 60.2 / 61.0 / 61.2 vs 58.2 / 62.4 / 69.4; attentive
# 54.8 / 57.8 / 55.8 vs 57.8 / 58.6 / 60.0; linear 13.8 / 14.0 / 13.2 vs 16.4 / 16.2 / 17.6. So these assert what
# holds: each learns far above chance (10%) from the pretrained encoder; the floors sit under the lowest run with
# room for `make test`'s two threads (the linear probe on pooled 32 px features barely leaves chance, random or not).
LEARNS_AT_LEAST = {"encoder": 45.0, "linear": 12.0, "attentive": 45.0}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", sorted(LEARNS_AT_LEAST))
def test_protocol_learns_from_the_pretrained_encoder(sources, tmp_path, protocol):
    top1 = protocol_top1(sources[0], tmp_path / protocol, protocol)
    print(protocol, top1)
    assert top1 >= LEARNS_AT_LEAST[protocol], (protocol, top1)


@pytest.mark.slow
def test_finetune_resumes_and_keeps_the_best(sources, tmp_path):
    from engine.finetune import finetune

    pretrained, _ = sources
    out = tmp_path / "run"
    first = finetune(finetune_config(pretrained, out, "predictor", steps=50, extra=["train.eval_every=25"]))
    assert first.step == 50
    before = torch.load(out / "checkpoint.pt", weights_only=True)
    assert before["kind"] == "finetune" and before["step"] == 50
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["top1"] == first.metrics["best_top1"]
    again = finetune(finetune_config(pretrained, out, "predictor", steps=60, extra=["train.eval_every=25"]))
    assert again.step == 60
    steps = [int(float(r.split(",")[0])) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps.count(50) >= 1 and max(steps) == 60


@pytest.fixture(scope="module")
def finetuned(sources, tmp_path_factory):
    from engine.finetune import finetune

    out = tmp_path_factory.mktemp("finetuned") / "encoder"
    finetune(finetune_config(sources[0], out, "encoder", steps=20))
    return out


@pytest.mark.slow
def test_eval_finetune_and_report(sources, finetuned, tmp_path):
    p = run_eval("finetune", "--ckpt", str(finetuned), "--out", str(tmp_path / "f.json"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["protocol"] == "encoder" and 0 <= res["top1"] <= res["top5"] <= 100
    assert f"top1 {res['top1']:.2f}" in p.stdout
    # the report gathers the finetuning run into its pretraining run's row
    p = run_eval("report", sources[0], str(finetuned))
    assert p.returncode == 0, p.stderr
    header, rule, row = p.stdout.strip().splitlines()
    assert header.startswith("| model | encoder FT | frozen enc + random pred |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    ft = json.loads((finetuned / "finetune.json").read_text())
    assert cells[1] == f"{ft['best_top1']:.1f}"


@pytest.mark.slow
def test_eval_attentive_probe_cli(sources, tmp_path):
    out = tmp_path / "probe"
    p = run_eval("attentive", "--ckpt", sources[0], "--epochs", "1", "--run-dir", str(out), "--out",
                 str(tmp_path / "a.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["probe"] == "attentive" and 0 <= res["val_top1"] <= 100
    assert torch.load(out / "checkpoint.pt", weights_only=True)["protocol"] == "attentive"


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(sources, finetuned, tmp_path):
    train_dir = write_folder(tmp_path / "train", classes=3, bad=False)
    val_dir = write_folder(tmp_path / "val", classes=2, bad=False)
    (tmp_path / "train" / "class_9").mkdir()  # a class folder without images
    other = write_folder(tmp_path / "other", classes=3, bad=False)
    shutil.rmtree(other / "class_2")
    (other / "class_2").mkdir()
    cases = [
        (["finetune", "--ckpt", sources[0]], "is a pretraining checkpoint"),
        (["attentive", "--ckpt", str(finetuned / "checkpoint.pt")], "is a finetune checkpoint"),
        (["attentive", "--ckpt", sources[0], "--data", str(train_dir)], "pass both --data"),
        (["attentive", "--ckpt", sources[0], "--data", str(train_dir), "--val", str(val_dir)], "holds no images"),
        (["finetune", "--ckpt", str(finetuned), "--val", str(val_dir)], "same class subfolders"),
    ]
    shutil.rmtree(tmp_path / "train" / "class_9")
    cases.append((["attentive", "--ckpt", sources[0], "--data", str(train_dir), "--val", str(val_dir)],
                  "different classes"))
    (tmp_path / "train" / "class_9").mkdir()
    for i, (args, needle) in enumerate(cases[:-1]):
        p = (run_eval if i == 0 else eval_in_process)(*args)  # one real command, the rest in this process
        assert p.returncode == 2, (args, p.stdout[-2000:], p.stderr[-2000:])
        assert needle in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
    shutil.rmtree(tmp_path / "train" / "class_9")
    p = eval_in_process(*cases[-1][0])
    assert p.returncode == 2 and cases[-1][1] in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
