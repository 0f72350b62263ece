"""Launching topocomm jobs: recipes and an emulated multi-node on one host.

Recipes (shell scripts next to this file; README, "Launching", shows each):

- ``torchrun-single.sh``: one node, torchrun ``--standalone``.
- ``torchrun-multi.sh``: several nodes, torchrun with c10d rendezvous (run it on every node).
- ``slurm.sbatch``: a SLURM batch job; srun starts one task per GPU and ``collectives.init()``
  reads SLURM's variables.
- ``mpirun.sh``: mpirun / mpiexec; ``collectives.init()`` agrees on an address over MPI, or
  ``TOPOCOMM_BACKEND=mpi`` runs every collective over MPI itself (``collectives.mpi``).

``python -m launch.emulate``: network namespaces as nodes, a shaped link between them
(see ``launch/emulate.py``; from Python: ``from launch.emulate import Emulation, EmulationSpec``).
"""
