"""Hydra plugins of SAFFU: the grid sweeper (``hydra/sweeper: saffu``) and the Ray launcher
(``hydra/launcher: ray``). Hydra imports every module under the ``hydra_plugins`` namespace
package at start-up, which registers both configs."""
