"""What the tests stand on, and nothing the package imports.

- ``hubserver``: a Hugging Face Hub test server speaking the real client's protocol, and its
  pytest fixtures (``hub_server``, ``hub_env``).
- ``kube``: a real local Kubernetes control plane, a kubelet stand-in, their fixtures, and the
  script that builds the binaries.
- ``models``: tiny generated bases and adapters (nothing is downloaded), and ``ModelFactory``.
- ``oracle``: the reference merges (the seed script's, PEFT's) the engines are tested against.
- ``tensors``: loading an output's tensors and comparing them bit for bit or in rounding steps.
- ``hub``: inputs seeded on the Hub test server and the seed-compatible publish command.
- ``kustomize``: k8s/ kustomizations built with the project's kubectl, and object comparison.

Test modules import helpers from here, never from one another. ``tests/conftest.py`` registers
the fixture modules as pytest plugins.
"""
