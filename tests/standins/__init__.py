"""Local stand-ins for cloud APIs that cannot be reached from the test machines, built from their published schemas."""
