FROM python:3.12-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY orchestrator.py .
# Inside a container the loopback default would be unreachable from the host.
ENV APP_SERVER_HOST=0.0.0.0
EXPOSE 8080
CMD ["python", "orchestrator.py"]
