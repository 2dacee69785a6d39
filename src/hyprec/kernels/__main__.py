"""``python -m hyprec.kernels``: build every kernel for this CPU now (``make`` runs it at set-up). A kernel that
cannot be built is reported and left to its pure-torch reference; set-up goes on."""

from hyprec.kernels import load, sources

for name in sources():
    status = "built" if load(name) is not None else "NOT built (see the warning above): its torch reference will run"
    print(f"hyprec kernel {name}: {status}")
