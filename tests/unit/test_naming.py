"""Deterministic ids: stable, valid for Cloud Tasks, distinct across jobs, GTINs and rounds."""

from hypothesis import given
from hypothesis import strategies as st

from shared.naming import chunk_task_name_for, is_valid_task_id, job_id_for, redrive_task_name_for, task_name_for

object_names = st.text(min_size=1, max_size=300).filter(lambda s: not s.endswith("/"))
gtins = st.text("0123456789", min_size=14, max_size=14)


@given(st.text(min_size=3, max_size=63), object_names, st.integers(1, 2**63))
def test_job_id_is_stable_and_a_valid_task_id_part(bucket, name, generation):
    a = job_id_for(bucket, name, generation)
    assert a == job_id_for(bucket, name, str(generation))
    assert is_valid_task_id(a) and len(a) <= 60


@given(object_names, st.integers(1, 2**62))
def test_new_generation_is_a_new_job(name, generation):
    assert job_id_for("b", name, generation) != job_id_for("b", name, generation + 1)


@given(st.text(min_size=1, max_size=80), gtins, st.integers(1, 1000))
def test_task_names_are_valid_and_stable(name, gtin, round_):
    job = job_id_for("bucket", name, 1)
    task = task_name_for(job, gtin, round_)
    assert is_valid_task_id(task) and len(task) <= 500
    assert task == task_name_for(job, gtin, round_)
    assert task.endswith(f"-{gtin}-r{round_}")


@given(gtins, gtins, st.integers(1, 50), st.integers(1, 50), object_names, object_names)
def test_task_names_collide_only_for_the_same_job_gtin_round(g1, g2, r1, r2, n1, n2):
    j1, j2 = job_id_for("b", n1, 1), job_id_for("b", n2, 2)
    same = (j1, g1, r1) == (j2, g2, r2)
    assert (task_name_for(j1, g1, r1) == task_name_for(j2, g2, r2)) == same


def test_chunk_names_differ_by_offset():
    job = job_id_for("b", "f.txt", 7)
    assert chunk_task_name_for(job, 0) != chunk_task_name_for(job, 262144)
    assert is_valid_task_id(chunk_task_name_for(job, 262144))


@given(st.text(min_size=1, max_size=300), gtins, st.integers(1, 1000), st.integers(1, 10**6))
def test_redrive_names_extend_the_round_name_and_stay_valid(name, gtin, round_, n):
    """Issue 15: a re-drive's task is the round's task name plus -d{n}, within Cloud Tasks' 500 characters."""
    job = job_id_for("bucket", name, 1)
    task = redrive_task_name_for(job, gtin, round_, n)
    assert task == f"{task_name_for(job, gtin, round_)}-d{n}" and is_valid_task_id(task) and len(task) <= 500
    assert task != redrive_task_name_for(job, gtin, round_, n + 1)


def test_redrive_number_starts_at_one():
    import pytest

    with pytest.raises(ValueError, match="starts at 1"):
        redrive_task_name_for("j", "00000000000017", 1, 0)
