"""`python -m zeroquant ...`, the form torchrun starts: `torchrun --nproc-per-node 8 -m zeroquant quantize MODEL`."""

from zeroquant.cli.app import run

if __name__ == "__main__":
    run()
