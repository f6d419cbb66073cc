# The hotswap CLI, the agent and the example server (examples/serve.py).
# torch is the CPU wheel; use a CUDA base image and index for GPU serving.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY hotswap ./hotswap
COPY publisher ./publisher
COPY examples ./examples
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home hotswap
USER hotswap
ENV HOTSWAP_REDIS_URL=redis://redis:6379/0 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
STOPSIGNAL SIGTERM
CMD ["python", "examples/serve.py", "--host", "0.0.0.0", "--port", "8000"]
