"""VIAR: visual implicit autoregressive modelling (arXiv 2605.01220). Built in a later milestone."""
