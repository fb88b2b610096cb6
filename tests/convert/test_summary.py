from endor.convert import format_summary


def _summary(sparsity):
    row = {"tensors": 4, "sparsity": sparsity, "dense_bytes": 8000, "stored_bytes": 4600}
    return {"by_type": {"mlp": row}, "decoder_linear": row,
            "total": {"tensors": 9, "dense_bytes": 9000, "stored_bytes": 5600, "ratio": 1.6}}


def test_zeros_beyond_the_pruned_fraction_are_explained():
    text = format_summary(_summary(0.503), 0.5)
    assert "0.5030 > the 0.5000 pruned: the source already held zeros" in text
    assert "already held" not in format_summary(_summary(0.5002), 0.5)  # rounding, not zeros


def test_without_pruning_the_zeros_are_the_sources():
    assert "no pruning: the decoder Linear sparsity 0.1000 is the source's own zeros" in \
        format_summary(_summary(0.1), None)
    assert "no pruning" not in format_summary(_summary(0.0), None)
    assert "already held" not in format_summary(_summary(0.5))  # no target given: no claim
