"""Foundations every layer uses: user errors, atomic files and digests, disk space, the
runtime (device, precision, seeds), timing sections, typed records, the methods registry."""
