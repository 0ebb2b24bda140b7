# A Debian 12 minbase image (apt, bash, python3 and python3-venv) from the rootfs.tar that
# compress/container/images.py makes with mmdebstrap: the base of the pipeline image.
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["/bin/bash"]
