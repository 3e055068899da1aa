"""Launch congeal_node beside a camera driver.

ros2 launch congeal congeal.launch.py image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
    mask:=/segmenter/mask params:=config/congeal_node.yaml
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    here = os.path.dirname(os.path.abspath(__file__))
    default_params = os.path.join(here, "..", "config", "congeal_node.yaml")
    args = [
        DeclareLaunchArgument("image", default_value="image", description="colour image topic"),
        DeclareLaunchArgument("camera_info", default_value="camera_info", description="camera info topic"),
        DeclareLaunchArgument("mask", default_value="mask", description="mono8 mask topic"),
        DeclareLaunchArgument("params", default_value=default_params, description="parameter file"),
    ]
    node = Node(
        package="congeal",
        executable="congeal_node",
        name="congeal",
        output="screen",
        parameters=[LaunchConfiguration("params")],
        remappings=[
            ("image", LaunchConfiguration("image")),
            ("camera_info", LaunchConfiguration("camera_info")),
            ("mask", LaunchConfiguration("mask")),
        ],
    )
    return LaunchDescription(args + [node])
