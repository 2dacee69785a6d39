"""Precision analysis: what may overflow in half precision, and where."""
