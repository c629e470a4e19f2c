"""Interrupts: a callback that raises stops the run, and leaves nothing behind for the next run."""
import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.pipeline import ksample

MODEL = analytic_model()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "uni_pc", "sa_solver"])
def test_interrupt_leaves_nothing_behind(sampler):
    args = (MODEL, 5, 8, 3.0, sampler, "karras", conditioning(1.0), conditioning(-1.0),
            {"samples": torch.zeros(1, 4, 8, 8)})
    clean = ksample(*args)["samples"]

    def stop_at_3(step, denoised, x, total):
        if step == 3:
            raise Interrupt()
    with pytest.raises(Interrupt):
        ksample(*args, callback=stop_at_3)
    again = ksample(*args)["samples"]
    assert torch.equal(clean, again)
