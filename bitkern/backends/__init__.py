"""Interchangeable implementations of the bitkern ops; bitkern.dispatch picks one per device."""
