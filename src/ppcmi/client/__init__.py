"""Code that runs AT A HOSPITAL: keys, local autoencoder training, encode+protect, unprotect+decode.

Plain latents (``z_*``) exist only here; what leaves is a keyed :class:`ppcmi.protocol.LatentBatch`.
"""
