"""Custom code of the MoME bundle (networks, inferer, transforms, converter); importable as ``scripts``."""
