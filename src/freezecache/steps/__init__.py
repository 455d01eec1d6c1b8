"""What each DVC stage does, one module per stage kind (so each stage's code deps are its own).

check -> prepare -> pretrain -> train_prefix -> baseline (normal, freezeout, controls)
                                             -> per discard method and freeze point:
                                                cache (ranking + compressed cache)
                                                -> train_suffix -> (next point) -> report
"""
