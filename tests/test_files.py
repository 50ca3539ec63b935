"""files.py: names near the file system's limit, temporaries (what is taken for one, what is kept), paths made
absolute, and what the command knows of the interrupts it was given."""

import os
import time

import pytest

from titok_fast import files


@pytest.mark.parametrize("name", ["a" * 215 + ".json", "é" * 120 + ".json"], ids=["220 bytes", "240 bytes"])
def test_a_file_whose_name_is_near_the_limit_in_bytes_is_written(tmp_path, name):
    """A name up to the file system's 255 bytes is written through a temporary that still fits that limit (the
    limit is in bytes: accented letters take two each), and only the file itself is left in the folder."""
    path = tmp_path / name
    files.write_atomically(path, b"{}")
    assert path.read_bytes() == b"{}" and os.listdir(tmp_path) == [name]


def test_a_temporary_another_writer_holds_is_kept_however_old(tmp_path):
    """Where locks are kept, a temporary a live writer holds is never taken as abandoned, even one last changed
    over an hour ago (a writer that stalled): a clean-up removing it would lose that writer's file."""
    writing = files.AtomicFile(tmp_path / "a.safetensors").__enter__()
    then = time.time() - files.ABANDONED_UNLOCKED_SECONDS - 60
    os.utime(writing.temporary, (then, then))
    files.remove_abandoned(writing.temporary)
    assert os.path.exists(writing.temporary)
    writing.discard()


def test_the_name_of_an_interrupt_handed_back_plainly_is_that_of_the_signal_given():
    """A SIGTERM that comes back as a plain KeyboardInterrupt (as Ray hands it back) is still named by what the
    command's handler was given, so the manifest says the run was terminated, not stopped by Ctrl-C."""
    files.forget_interrupts()
    try:
        with pytest.raises(files.Terminated):
            files.interrupt(files.Terminated("signal SIGTERM"))
        assert files.interrupt_name(KeyboardInterrupt()) == "signal SIGTERM"
    finally:
        files.forget_interrupts()
    assert files.interrupt_name(KeyboardInterrupt()) == "Ctrl-C"


def test_a_users_file_named_like_a_temporary_with_more_after_it_is_kept(tmp_path):
    """Only a name that is exactly a temporary's (``.<name>.<32 hex>.tmp``) is taken for one a killed writer
    left: a user's ``.a.json.<32 hex>.tmp.notes`` beside a file written alone is kept."""
    notes = tmp_path / f".a.json.{'0' * 32}.tmp.notes"
    notes.write_bytes(b"mine")
    files.write_atomically(tmp_path / "a.json", b"{}", tidy=True)
    assert notes.read_bytes() == b"mine"


def test_a_file_reached_through_a_link_after_dotdot_keeps_its_name(tmp_path):
    """Made absolute, a path whose last name is a link keeps that name (only the folders up to the last ``..``
    are resolved): an input ``d/../d/alias.mp4`` is the file alias.mp4, named as the user named it."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "real.mp4").write_bytes(b"")
    os.symlink("real.mp4", tmp_path / "d" / "alias.mp4")
    assert files.absolute(str(tmp_path / "d" / ".." / "d" / "alias.mp4")) == str(tmp_path / "d" / "alias.mp4")


def test_a_sigterm_held_behind_a_ctrl_c_is_still_known():
    """After a SIGTERM then a Ctrl-C, the command still knows a SIGTERM came (a scheduler is stopping the job),
    whichever came last."""
    files.forget_interrupts()
    try:
        with pytest.raises(files.Terminated), files.interrupts_held():  # (the first, raised at the block's end)
            files.interrupt(files.Terminated("signal SIGTERM"))
            files.interrupt(KeyboardInterrupt())
        came = files.sigterm_came()
    finally:
        files.forget_interrupts()
    assert came
