# Node image for engines that cannot pull (see testbed/runtime/image.py, mode "offline").
# BASE is the locally imported Debian bookworm root filesystem (python3 3.11, iproute2).
# The Python packages are the host venv's site-packages, bind-mounted read-only at
# /opt/testbed/site when a container starts; only the testbed code is baked in, last,
# so a code change rebuilds in seconds.
ARG BASE=testbed-base:bookworm
FROM ${BASE}
ENV PYTHONPATH=/opt/testbed/src:/opt/testbed/site \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /opt/testbed
COPY testbed /opt/testbed/src/testbed
CMD ["python3", "-c", "from testbed.cli.main import main; main()", "--help"]
