import numpy as np

from models.build.evaluate import attention_focus, bucket_accuracy, summarise


def test_bucket_accuracy_counts_each_bucket_by_class() -> None:
    buckets = np.array(["many", "mid", "few"])
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 0])
    acc = bucket_accuracy(pred, labels, buckets)
    assert acc == {"many": 50.0, "mid": 100.0, "few": 25.0, "all": 50.0}


def test_attention_focus_compares_mass_with_share() -> None:
    item_labels = np.array([0, 1, 0, 1])
    ids = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    labels = np.array([0, 1])
    attn = np.array([[0.4, 0.1, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]])
    out = attention_focus(attn, ids, item_labels, labels, np.array(["many", "few"]))
    assert out["many"] == {"attention": 80.0, "share": 50.0}
    assert out["few"] == {"attention": 50.0, "share": 50.0}
    assert "mid" not in out and out["all"]["attention"] == 65.0


def test_summary_is_mean_and_spread_over_seeds() -> None:
    runs = [{"test": {"accuracy": {"all": a}}, "seconds": 1.0} for a in (80.0, 82.0, 84.0)]
    s = summarise(runs)
    assert s["test"]["accuracy"]["all"] == {"mean": 82.0, "std": np.std([80, 82, 84]), "n": 3}
