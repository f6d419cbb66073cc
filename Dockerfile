# The hotswap CLI, agent and example server. torch is the CPU wheel; swap the
# index for a CUDA build in GPU images.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY hotswap ./hotswap
COPY publisher ./publisher
COPY examples ./examples
RUN pip install --no-cache-dir .
ENV HOTSWAP_REDIS_URL=redis://redis:6379/0
EXPOSE 8000
CMD ["python", "examples/serve.py", "--host", "0.0.0.0", "--port", "8000"]
