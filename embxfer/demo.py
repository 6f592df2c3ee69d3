"""`python -m embxfer.demo` (what torchrun runs): the same as `embxfer demo`."""

from embxfer.runtime.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
