FROM python:3.12-slim
WORKDIR /app
# The module and its two dependencies, with the `orchestrator` command.
COPY pyproject.toml README.md orchestrator.py ./
RUN pip install --no-cache-dir .
# Inside a container the loopback default would be unreachable from the host.
ENV APP_SERVER_HOST=0.0.0.0
# Bound beyond loopback the Host rule is off unless names are listed: list the one a
# published port is reached by, so a DNS-rebinding page cannot reach the queue. Add
# the names other machines use (-e APP_SECURITY_ALLOWED_HOSTS=localhost,box.lan).
ENV APP_SECURITY_ALLOWED_HOSTS=localhost
# The tasks live on a volume, so a new container continues the old one's queue.
ENV APP_DATA_FILE=/data/tasks.db
RUN mkdir /data
VOLUME /data
EXPOSE 8080
CMD ["orchestrator"]
