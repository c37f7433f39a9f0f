# Pod sandbox image of the real test node (kubelet's pause container): a static busybox
# that sleeps. Nothing is pulled from a registry.
FROM scratch
COPY busybox /bin/busybox
USER 65535:65535
ENTRYPOINT ["/bin/busybox", "sleep", "2147483647"]
