# The scaleq worker image: Debian bookworm's Python 3.11 with scaleq installed in a virtualenv at /opt/scaleq.
#
# Built by scripts/worker-image.sh, never by hand: the script makes the base image (debootstrap from the apt mirror;
# there is no container registry to pull from) and the build context, a wheelhouse built on the host:
#   wheels/deps/    scaleq's dependencies (a layer of its own, cached while pyproject.toml does not change)
#   wheels/scaleq/  the scaleq wheel of the current source
# Everything installs offline (--no-index): build containers have no network (--network=none).
FROM scaleq-test/python:bookworm

COPY wheels/deps/ /tmp/wheels/deps/
RUN python3 -m venv /opt/scaleq \
 && /opt/scaleq/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check /tmp/wheels/deps/*.whl \
 && rm -rf /tmp/wheels/deps

COPY wheels/scaleq/ /tmp/wheels/scaleq/
RUN /opt/scaleq/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check --no-deps \
        /tmp/wheels/scaleq/*.whl \
 && /opt/scaleq/bin/pip check --disable-pip-version-check \
 && rm -rf /tmp/wheels \
 && /opt/scaleq/bin/scaleq worker --help >/dev/null

ENV PATH=/opt/scaleq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
# The docker provider runs `scaleq worker --server … --queue … …` as the command (with an init process in front, so
# SIGTERM reaches the worker and drains it). Without a command the image shows the worker's usage.
CMD ["scaleq", "worker", "--help"]

# Last, so that a new source hash does not invalidate the install layers above.
ARG SOURCE_HASH=unknown
LABEL org.opencontainers.image.title="scaleq worker" \
      scaleq.image=worker \
      scaleq.source-hash=$SOURCE_HASH
