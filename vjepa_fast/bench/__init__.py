"""The code of `vjepa-fast bench` and `vjepa-fast profile`: step timing and MFU, FLOP counts, the ceilings."""
