# The test clusters' local stand-in for the public base images (python:3.11-slim, the CUDA
# runtime): a debootstrapped Debian bookworm with Python 3.11, so the project's own
# Dockerfiles build here unchanged with BASE_IMAGE pointing at it. Test use only.
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
