"""What a norm needs of the model around it, and its refusal to train without it."""

from __future__ import annotations


class NeedsWiring:
    """Mixin of a norm that needs something of the model around it (``wiring``: what, in
    words): its conv centralized (MABN), standardized (GN+WS) or read (CBN), or the ReLU after
    it (EvoNorm, FRN). ``mabn.wire_norms`` gives it and sets ``wired``; until then a training
    forward stops with one line that names that call."""

    wiring = ""
    wired = False

    def check_wired(self) -> None:
        if self.training and not self.wired:
            raise RuntimeError(
                f"{type(self).__name__} is not wired ({self.wiring}): call mabn.wire_norms(model) once the model is "
                "built (mabn.convert_model and the suite's entry points do; wire_norms(model, centralize=False) "
                "leaves MABN's convs uncentralized on purpose)"
            )
