# The base of the runtime images: Debian 12's python3.11 for one architecture and a non-root user
# `edge` (10001), nothing else (no shell, no package manager). The context is the rootfs.tar that
# compress/container/images.py unpacks with mmdebstrap; build with --platform linux/amd64 or linux/arm64.
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin
USER 10001:10001
CMD ["/usr/bin/python3.11"]
