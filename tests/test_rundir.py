"""`claim_out_dir` knows every saved-run kind: a new run never writes into another one."""

import pytest

from autoglm.rundir import KINDS, RunDir, claim_out_dir


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_saved_run_kind_is_refused_as_a_new_runs_out(tmp_path, kind):
    out = tmp_path / kind
    out.mkdir()
    for f in KINDS[kind][0]:
        (out / f).write_text("{}")
    assert RunDir.detect(out) == kind
    with pytest.raises(FileExistsError, match=f"already holds a {KINDS[kind][1]}.*--overwrite"):
        claim_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(KINDS[kind][0])  # untouched
    claim_out_dir(out, resume=True)  # resuming may write there
    claim_out_dir(out, overwrite=True)
    assert not out.exists()


def test_the_aligned_kind_is_what_the_align_recipe_saves():
    from autoglm.multimodal.store import ALIGN_FILES

    assert tuple(ALIGN_FILES) == KINDS["align"][0]


def test_an_adapter_where_a_model_is_needed_names_merge(tmp_path):
    lora = tmp_path / "a-lora"
    lora.mkdir()
    for f in KINDS["lora"][0]:
        (lora / f).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"looks like a LoRA adapter directory; fold it into its base model "
                                                f"with `autoglm merge {lora} --out {lora}-merged`"):
        RunDir.open(lora)
