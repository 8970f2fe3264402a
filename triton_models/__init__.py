"""Templates of the Triton python-backend models; ``persrec export`` copies them into a model
repository (shipped as package data, so export works from a wheel too)."""
